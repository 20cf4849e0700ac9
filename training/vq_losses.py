"""The image tokenizer's extra training losses: a perceptual loss and an adversarial PatchGAN loss (VQGAN's recipe).

* ``PerceptualLoss``: distances between VGG16 feature maps of the reconstruction and of the original, at the
  five taps LPIPS uses (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), each feature vector unit-normalised over
  its channels, squared differences summed over channels and averaged over positions, the taps weighted
  equally. The weights come only from a file the user names (a safetensors state dict with torchvision's
  ``features.N.weight`` / ``features.N.bias`` names; other keys are ignored); nothing is downloaded. The
  channel counts are read from the file, so any VGG16-shaped network of 3x3 convs loads.
* ``Adversarial``: a PatchGAN discriminator (stride-2 4x4 convs, GroupNorm, LeakyReLU; one logit per patch)
  with its own AdamW optimizer, trained with the hinge loss; the generator's term -mean(D(reconstruction)) is
  weighted adaptively as in VQGAN: the ratio of the gradient norms of the reconstruction loss and of the
  GAN loss at the decoder's last layer, clamped to [0, 1e4], times ``gan_weight``. Its state (weights and
  optimizer) is part of every training checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from earlyfusion.core.checkpoint import read_weights
from earlyfusion.core.errors import UserError

# ---------------------------------------------------------------- perceptual loss

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
"""torchvision's vgg16.features up to relu5_3: conv widths, "M" = 2x2 max pool (each conv is followed by a ReLU)."""
_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics VGG16 was trained with
_STD = (0.229, 0.224, 0.225)


def _vgg_indices() -> tuple[list[int], list[int], list[int]]:
    """(conv indices, pool indices, tap indices = the ReLU before each pool and the last ReLU) in features.N."""
    convs, pools, i = [], [], 0
    for item in VGG16_LAYOUT:
        if item == "M":
            pools.append(i)
            i += 1
        else:
            convs.append(i)
            i += 2  # conv, relu
    return convs, pools, [p - 1 for p in pools] + [i - 1]


class PerceptualLoss(nn.Module):
    """Frozen VGG16 features -> a perceptual distance per batch (scalar); inputs in [-1, 1]."""

    def __init__(self, widths: list[tuple[int, int]]):
        super().__init__()
        convs, pools, self.taps = _vgg_indices()
        layers: list[nn.Module] = []
        widths_iter = iter(widths)
        for i in range(self.taps[-1] + 1):
            if i in pools:
                layers.append(nn.MaxPool2d(2, 2))
            elif i in convs:
                c_in, c_out = next(widths_iter)
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> "PerceptualLoss":
        """The network with the weights of ``path``; UserError (one line) if the file is missing or not VGG16-shaped."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"--perceptual-weights {path}: file not found; give a safetensors file of VGG16 features "
                            "(torchvision's names: features.0.weight, ...)")
        tensors = read_weights(path)
        convs, _, _ = _vgg_indices()
        want = {f"features.{i}.{k}" for i in convs for k in ("weight", "bias")}
        have = {k for k in tensors if k.startswith("features.")}
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise UserError(f"--perceptual-weights {path}: not VGG16 features in torchvision's layout (missing "
                            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
        widths, c_prev = [], 3
        for i in convs:
            w, b = tensors[f"features.{i}.weight"], tensors[f"features.{i}.bias"]
            if w.ndim != 4 or w.shape[1] != c_prev or tuple(w.shape[2:]) != (3, 3) or tuple(b.shape) != (w.shape[0],):
                raise UserError(f"--perceptual-weights {path}: features.{i}.weight has shape {tuple(w.shape)} (bias "
                                f"{tuple(b.shape)}); expected (C, {c_prev}, 3, 3) after the previous layer's {c_prev} channels")
            widths.append((c_prev, int(w.shape[0])))
            c_prev = int(w.shape[0])
        module = cls(widths)
        module.load_state_dict({k: tensors[k].float() for k in want}, strict=True)
        return module

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # always frozen, never in training mode

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b (B, 3, H, W) in [-1, 1] -> mean over the batch of the summed per-tap distances (scalar)."""
        x = (torch.cat([a, b]) + 1) / 2
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # (2B, 3, H, W)
        total = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.features):
            if isinstance(layer, nn.MaxPool2d) and min(h.shape[-2:]) < 2:
                break  # the image is too small for the deeper taps
            h = layer(h)
            if i in self.taps:
                f = h.float()
                f = f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
                fa, fb = f.chunk(2)
                total = total + (fa - fb).square().sum(1).mean()
        return total


# ---------------------------------------------------------------- adversarial loss


def disc_layers(image_size: int) -> int:
    """Stride-2 layers of the discriminator: 3 (70x70 patches, as in pix2pix/VQGAN), fewer for small images."""
    return max(1, min(3, int(math.log2(image_size)) - 3))


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) -> (B, 1, h, w) real/fake logits, one per overlapping patch."""

    def __init__(self, image_size: int, width: int = 64):
        super().__init__()
        n = disc_layers(image_size)
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, n + 1):
            c_out = width * min(2 ** i, 4)
            stride = 2 if i < n else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1), nn.GroupNorm(16, c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's balance: |d rec / d last| / |d gan / d last|, clamped to [0, 1e4], no gradient."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class Adversarial:
    """The discriminator, its optimizer, and the two halves of the hinge GAN loss."""

    def __init__(self, image_size: int, lr: float):
        self.disc = PatchDiscriminator(image_size)
        # the module itself, which the generator's loss runs; ``disc`` may become its DDP wrapper, whose forward
        # would arm a gradient reduction that the generator's backward (no gradient for the discriminator) never runs
        self.plain = self.disc
        self.optimizer = torch.optim.AdamW(self.disc.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)

    def generator_loss(self, recon: torch.Tensor, rec_loss: torch.Tensor, last_layer: torch.Tensor,
                       gan_weight: float) -> tuple[torch.Tensor, dict]:
        """(gan_weight * adaptive weight * -mean(D(recon)), {"gan": ..., "gan_weight": ...} detached)."""
        self.plain.requires_grad_(False)
        try:
            g = -self.plain(recon).float().mean()
        finally:
            self.plain.requires_grad_(True)
        w = adaptive_weight(rec_loss, g, last_layer)
        return gan_weight * w * g, {"gan": g.detach(), "gan_weight": w}

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, lr: float, backward, clip, mean) -> float:
        """One update of the discriminator on real vs (detached) reconstructed images; returns its loss averaged
        over the processes (a non-finite one is not applied, by every process alike). ``backward``/``clip``/``mean``
        are the trainer's."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss = hinge_d_loss(self.disc(real).float(), self.disc(fake.detach()).float())
        value = mean(float(loss.detach()))  # one process alone skipping the backward would leave the others waiting
        if math.isfinite(value):
            backward(loss)
            gnorm = float(clip(self.disc.parameters()))
            if math.isfinite(gnorm):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value
