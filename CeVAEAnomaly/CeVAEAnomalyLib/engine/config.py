"""Configuration dataclasses shared by training, the bundle and detection."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..errors import CeVAEError
from ..options import Serialisable

SUPPORTED_INPUT_SIZES = (64, 128)
MAX_CHANNELS = 4096  # widest layer a model (and so a bundle) may have
MAX_Z = 8192  # largest latent size a model (and so a bundle) may have
# What one slice may cost a model (and so a bundle), in one pass through its encoder and decoder: the values its
# layers output and their multiply-adds. The widths above leave room for a small file whose layers are huge: a first
# layer of 4096 channels at 128 px (1 MB of weights) computes 34 million values per slice, so one detection of the
# 2 mm sample took 5.5 GB with batches of 16 slices (about 21 GB with the default 64) and 5.6 min on one CPU thread.
# The bundled model computes 0.07 million values and 0.02 billion multiply-adds, 128 px with the default widths 0.28
# and 0.08; networks just beyond the limits below took 3.0 GB and 48 s, 1.9 GB and 90 s (docs/WHAT_HAPPENS_WHEN.md).
MAX_SLICE_VALUES = 4_000_000
MAX_SLICE_MULTIPLY_ADDS = 10_000_000_000
# widest margin around the brain a model (and so a bundle) may have: detection allocates slices of the brain plus
# twice it (1000 mm took 7.7 GB on a scan of 0.5 mm voxels, where 4 mm took 1 GB)
MAX_MARGIN_MM = 100.0


def _check_input_size(size: int) -> None:
    """Refuse a slice side the models are not built for, naming the option (keyword and flag)."""
    if size not in SUPPORTED_INPUT_SIZES:
        raise CeVAEError(f"input_size (--input-size) must be one of {', '.join(map(str, SUPPORTED_INPUT_SIZES))}, "
                         f"got {size}.")


@dataclass(frozen=True)
class ModelConfig(Serialisable):
    """Architecture of the 2D ceVAE (defaults: the MICCAI-19 layout)."""

    input_size: int = 64
    channels: Tuple[int, ...] = (16, 32, 64, 256)
    z_dim: int = 256

    def __post_init__(self) -> None:
        _check_input_size(self.input_size)
        if not self.channels or any(not 1 <= int(c) <= MAX_CHANNELS for c in self.channels):
            raise CeVAEError(f"channels (--channels) must be widths of 1 to {MAX_CHANNELS} each, "
                             f"got {','.join(map(str, self.channels)) or 'none'}.")
        if not 1 <= self.z_dim <= MAX_Z:
            raise CeVAEError(f"z_dim (--z-dim, the latent size) must be a whole number from 1 to {MAX_Z}, "
                             f"got {self.z_dim}.")

    @property
    def bottleneck_size(self) -> int:
        """Spatial side of the last encoder feature map (4x4 stride-2 convs halve it)."""
        return self.input_size // 2 ** len(self.channels)

    def slice_cost(self) -> Tuple[int, int]:
        """(values, multiply-adds) of one slice's pass through the encoder and decoder: the elements every convolution
        outputs, and the multiply-adds they take (:mod:`.model`'s layers; needs ``bottleneck_size`` >= 1)."""
        side, b, z = self.input_size, self.bottleneck_size, self.z_dim
        values = adds = 0
        in_ch = 1
        for ch in self.channels:  # 4x4 stride-2 convolutions: each output element sums 16 inputs of each channel
            side //= 2
            values += ch * side * side
            adds += ch * side * side * in_ch * 16
            in_ch = ch
        values += 2 * z  # the b x b convolution to mean and log-variance
        adds += 2 * z * in_ch * b * b
        chans = self.channels[::-1]
        values += chans[0] * b * b  # the b x b transposed convolution from the latent code
        adds += chans[0] * b * b * z
        for in_ch, out_ch in zip(chans, (*chans[1:], 1)):  # 4x4 stride-2 transposed: each input element adds 16
            adds += in_ch * side * side * out_ch * 16
            side *= 2
            values += out_ch * side * side
        return values, adds

    def cost_excess(self) -> Optional[str]:
        """Why one slice costs this network more than a model may (:data:`MAX_SLICE_VALUES`,
        :data:`MAX_SLICE_MULTIPLY_ADDS`), in words; None if it does not."""
        values, adds = self.slice_cost()
        if values > MAX_SLICE_VALUES:
            return (f"computes {values:,} values per slice (the outputs of its layers), more than the limit of "
                    f"{MAX_SLICE_VALUES:,}")
        if adds > MAX_SLICE_MULTIPLY_ADDS:
            return f"needs {adds:,} multiply-adds per slice, more than the limit of {MAX_SLICE_MULTIPLY_ADDS:,}"
        return None


MAX_BETA = 1e6  # the largest KL weight a bundle may declare


@dataclass(frozen=True)
class LossConfig(Serialisable):
    """Loss = (1-c)·(β·KL + rec_VAE) + c·rec_CE, with means over pixels and latents."""

    ce_weight: float = 0.5  # c
    beta: float = 0.01  # β
    rec: str = "l1"  # "l1" or "l2"

    def __post_init__(self) -> None:
        if self.rec not in ("l1", "l2"):
            raise CeVAEError(f"rec (--rec-loss) must be one of l1, l2, got {self.rec!r}.")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise CeVAEError(f"ce_weight (--ce-weight) must lie in [0, 1], got {self.ce_weight}.")
        if not 0.0 <= self.beta <= MAX_BETA:  # also refuses NaN; a bundle may declare no more (bundle_checks)
            raise CeVAEError(f"beta (--beta, the KL weight) must be a number from 0 to {MAX_BETA:g}, got {self.beta}.")


@dataclass(frozen=True)
class PreprocessConfig(Serialisable):
    """How a volume becomes model slices (stored in the bundle so detection matches training)."""

    input_size: int = 64
    low_percentile: float = 1.0
    high_percentile: float = 99.0
    clip_max: float = 1.5  # values above the high percentile keep contrast up to this
    margin_mm: float = 4.0  # padding around the brain's bounding box
    min_brain_fraction: float = 0.02  # training slices need at least this share of brain pixels

    def __post_init__(self) -> None:
        _check_input_size(self.input_size)
        if not 0.0 <= self.margin_mm <= MAX_MARGIN_MM:  # (also refuses NaN)
            raise CeVAEError(f"The preprocessing margin (margin_mm) must be a number from 0 to {MAX_MARGIN_MM:g} mm, "
                             f"got {self.margin_mm}.")
