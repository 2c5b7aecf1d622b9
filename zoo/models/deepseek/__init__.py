"""The DeepSeek family (DeepSeek-V2/V3, Kimi K2, Moonlight): multi-head latent attention and DeepSeekMoE."""
