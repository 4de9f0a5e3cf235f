"""The paper's metrics, one module each, all offline (every weight file is a local path).

- likelihood: NLL in bits/dim via the probability-flow ODE of the model's own VP schedule.
- similarity: image descriptors (SSCD, SSIM, pixel cosine, TorchScript) and the reconstruction
  probe (noise to T/4, denoise with ancestral DDPM, compare).
- copies: fraction of samples copying a forget image (L2 < 10 in [0, 1] pixels, or a descriptor).
- quality: FID, Inception Score and CLIP-IQA through torchmetrics.

Submodules are imported on use, so importing this package stays cheap.
"""
