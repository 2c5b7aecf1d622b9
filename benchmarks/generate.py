"""Generation benchmark: decode tokens/s and time-to-first-token by batch size, the
zoo's KV-cache `zoo.generate` vs `transformers` PyTorch `generate`, same weights,
same prompts, greedy.

TTFT = wall time of generating 1 token (prefill + first sample). Decode tokens/s =
batch * (N - 1) / (time(N tokens) - time(1 token)), so prefill is excluded.
Our times exclude compilation (one warm-up call per shape first).

    python -m benchmarks.generate --batch-sizes 1 4 16 --new-tokens 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import jax
import numpy as np

import zoo
from benchmarks.common import RESULTS_DIR, device_info, markdown_table, write_json
from zoo.argtypes import positive_int


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4, 16])
    p.add_argument("--prompt-len", type=positive_int, default=64)
    p.add_argument("--new-tokens", type=positive_int, default=64)
    p.add_argument("--hidden", type=positive_int, default=512, help="model width of the Llama-architecture test model")
    p.add_argument("--layers", type=positive_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--name", default=None, help="result file stem (default generate_<platform>)")
    args = p.parse_args(argv)

    import torch  # optional dependency: PyTorch is only needed for this comparison
    import transformers as tf

    torch.manual_seed(0)
    hf_cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                            num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096)
    hf = tf.LlamaForCausalLM(hf_cfg).eval()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = zoo.from_hf(d)
    rng = np.random.default_rng(0)
    for b in args.batch_sizes:
        ids = rng.integers(1, hf_cfg.vocab_size, (b, args.prompt_len))
        mask = np.ones_like(ids)
        for name in ("zoo", "transformers"):
            if name == "zoo":
                def gen(n):
                    return jax.block_until_ready(zoo.generate(model, params, ids, mask, max_new_tokens=n))
                gen(1), gen(args.new_tokens)  # compile both shapes
            else:
                tids, tmask = torch.tensor(ids), torch.tensor(mask)

                def gen(n):
                    with torch.no_grad():
                        return hf.generate(tids, attention_mask=tmask, max_new_tokens=n, min_new_tokens=n,
                                           do_sample=False, pad_token_id=0)
                gen(1)
            t1 = _median_time(lambda: gen(1), args.repeats)
            tn = _median_time(lambda: gen(args.new_tokens), args.repeats)
            row = dict(impl=name, batch=b, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       ttft_ms=t1 * 1e3, decode_tokens_per_s=b * (args.new_tokens - 1) / max(tn - t1, 1e-9))
            rows.append(row)
            print(f"{name:>12} batch={b:<3} TTFT {row['ttft_ms']:.1f} ms  "
                  f"decode {row['decode_tokens_per_s']:.1f} tok/s", flush=True)
    for b in args.batch_sizes:
        ours, theirs = (next(r for r in rows if r["impl"] == i and r["batch"] == b) for i in ("zoo", "transformers"))
        ours["speedup_vs_transformers"] = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
    dev = device_info()
    payload = dict(device=dev, torch_version=torch.__version__, model=hf_cfg.to_dict(), rows=rows)
    path = write_json(args.name or f"generate_{dev['platform']}", payload, args.out)
    print(markdown_table(rows, ["impl", "batch", "ttft_ms", "decode_tokens_per_s", "speedup_vs_transformers"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
