"""SteeringVectors: per-layer bias / prefix vectors added to the output of one submodule per decoder layer.

How a forward pass is steered:
1. A pre-forward hook on the model works out, once per call, which positions are real tokens (attention
   mask) and which lie in the prefix window, from the absolute column of each position (cache length +
   offset, so cached decoding is exact) and each row's response start.
2. It calls `self(...)` - a real module call, so DeepSpeed ZeRO-3 gathers the parameters around it -
   which returns the scaled vectors and the two masks.
3. A forward hook on each steered site adds `bias_mask * bias[l] + prefix_mask * prefix[l]` to its output,
   cast to the hidden dtype. Padding positions get nothing; zero vectors leave the output bit-identical.

Response start (where the answer begins, per row): set explicitly with `window(start)` for training
forwards (right-padded rows: each row's prompt length; left-padded: the padded prompt width). Otherwise a
forward on an empty cache treats its whole input as the prompt and remembers its width for the cached
decoding steps that follow, which is exactly what `generate()` on a left-padded batch needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from brep_rl.config import CONFIG_NAME, ConfigError, SteeringConfig
from brep_rl.model import decoder_layers, freeze, site_module

WEIGHTS_NAME = "steering.safetensors"
ATTRIBUTE = "brep_steering"  # the steering module's name inside the model


class ArtifactError(ValueError):
    """A saved steering artifact is missing, corrupt, or does not fit the model."""


@dataclass
class _Active:
    """What the site hooks add during one forward call, shaped so the common cases cost one add or nothing:
    bias_mask None means every position is a real token (no padding); prefix None means no position of this call
    lies in the window (decoding past it); prefix_everywhere means every position does."""

    bias: torch.Tensor | None  # [L, d], scaled, in the autograd graph
    prefix: torch.Tensor | None
    bias_mask: torch.Tensor | None  # [B, T, 1] in the hidden dtype: real (non-padding) tokens
    prefix_mask: torch.Tensor  # [B, T, 1] in the hidden dtype: real tokens inside the prefix window
    prefix_everywhere: bool = False


class SteeringVectors(nn.Module):
    """fp32 steering parameters `bias` and `prefix` ([layers, dim]; None when the mode does not use one)."""

    def __init__(self, config: SteeringConfig, layers: Sequence[int], dim: int):
        super().__init__()
        self.config = config
        self.layer_ids = list(layers)
        self.dim = dim
        shape = (len(self.layer_ids), dim)
        self.bias = nn.Parameter(self._init(shape)) if config.uses_bias else None
        self.prefix = nn.Parameter(self._init(shape)) if config.uses_prefix else None
        self.scale = 1.0
        self.enabled = True
        self._explicit_start: torch.Tensor | None = None
        self._generation_start: int | None = None
        self._active: _Active | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._model_ref: weakref.ref | None = None

    def _init(self, shape: tuple[int, int]) -> torch.Tensor:
        if self.config.init == "zeros":
            return torch.zeros(shape, dtype=torch.float32)
        return torch.randn(shape, dtype=torch.float32) * self.config.init_std

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # model.to(bfloat16) must not touch the vectors: they stay fp32 and are cast when added.
        super()._apply(fn, recurse)
        for p in self.parameters():
            if p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    # ---- attach / detach -------------------------------------------------------------------------------

    @classmethod
    def attach(cls, model: nn.Module, config: SteeringConfig | None = None) -> SteeringVectors:
        """Freeze `model` and hook steering vectors onto it. The vectors become the model's only trainable parameters."""
        config = config if config is not None else SteeringConfig()
        if hasattr(model, ATTRIBUTE):
            raise ValueError("this model already has steering vectors attached; call .detach() on them first")
        layers = decoder_layers(model)
        n = len(layers)
        ids = list(config.layers) if config.layers is not None else list(range(n))
        bad = [i for i in ids if i >= n]
        if bad:
            raise ValueError(f"steering layers {bad} do not exist: the model has {n} decoder layers (0..{n - 1})")
        sites = [site_module(layers[i], config.site, i) for i in ids]
        dim = _output_dim(sites[0], config.site)
        _check_matches(config, model, dim)

        cfg = model.config
        config.base_model = config.base_model or getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
        config.hidden_size, config.num_hidden_layers = cfg.hidden_size, cfg.num_hidden_layers
        config.model_type = cfg.model_type
        config.layers = ids

        freeze(model)
        device = next(model.parameters()).device
        steer = cls(config, ids, dim).to(device)
        setattr(model, ATTRIBUTE, steer)  # registered submodule: trainers, DDP and DeepSpeed see the parameters
        steer._model_ref = weakref.ref(model)
        steer._handles.append(model.register_forward_pre_hook(steer._before_forward, with_kwargs=True))
        steer._handles.append(model.register_forward_hook(steer._after_forward))
        for row, site in enumerate(sites):
            steer._handles.append(site.register_forward_hook(steer._site_hook(row)))
        return steer

    def detach(self) -> None:
        """Remove the hooks and the module from the model; the model is the plain base again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        model = self._model_ref() if self._model_ref else None
        if model is not None and getattr(model, ATTRIBUTE, None) is self:
            delattr(model, ATTRIBUTE)
        self._model_ref = None

    @property
    def model(self) -> nn.Module:
        model = self._model_ref() if self._model_ref else None
        if model is None:
            raise RuntimeError("these steering vectors are not attached to a model")
        return model

    # ---- contexts --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The plain base model, same object: no second copy in memory."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @contextlib.contextmanager
    def window(self, response_start: torch.Tensor | Sequence[int] | int) -> Iterator[None]:
        """Set each row's response start (column of its first answer token) for plain forwards.

        The prefix vector then covers every real token before `response_start[i] + prefix_tokens`.
        """
        start = torch.as_tensor(response_start, dtype=torch.long).reshape(-1)
        previous, self._explicit_start = self._explicit_start, start
        try:
            yield
        finally:
            self._explicit_start = previous

    @contextlib.contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        """Steer at `scale` times the trained strength (0 = base, 1 = as trained)."""
        previous, self.scale = self.scale, float(scale)
        try:
            yield
        finally:
            self.scale = previous

    # ---- the forward machinery -------------------------------------------------------------------------

    def forward(self, valid: torch.Tensor, columns: torch.Tensor, response_start: torch.Tensor) -> tuple:
        """valid [B, T] bool, columns [T] absolute positions, response_start [B] -> what the site hooks add:
        (scaled bias, scaled prefix, bias mask [B, T, 1], prefix mask [B, T, 1]). A tuple of tensors, not an
        object, so that DeepSpeed ZeRO-3 can hook the outputs and re-gather the vectors for the backward pass."""
        in_window = columns[None, :] < (response_start[:, None] + self.config.prefix_tokens)
        return (
            self.bias * self.scale if self.bias is not None else None,
            self.prefix * self.scale if self.prefix is not None else None,
            valid[..., None],
            (valid & in_window)[..., None],
        )

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._active = None
        if not self.enabled:
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, length = tokens.shape[:2]
        device = tokens.device
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        columns = torch.arange(past, past + length, device=device)

        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and mask.dim() == 2:
            valid = (mask[:, columns] if mask.shape[1] == past + length else mask[:, -length:]).bool()
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)

        if self._explicit_start is not None:
            start = self._explicit_start.to(device)
            if start.numel() == 1:
                start = start.expand(batch)
            elif start.numel() != batch:
                raise ValueError(f"window(): got {start.numel()} response starts for a batch of {batch} rows")
        else:
            if past == 0 or self._generation_start is None:
                # A fresh sequence: its input is the prompt (what was already cached counts as prompt too).
                self._generation_start = past + length if past == 0 else past
            start = torch.full((batch,), self._generation_start, dtype=torch.long, device=device)
        bias, prefix, bias_mask, prefix_mask = self(valid, columns, start)
        dtype = _hidden_dtype(module)
        self._active = _Active(
            bias=bias,
            prefix=prefix if bool(prefix_mask.any()) else None,
            bias_mask=None if bool(bias_mask.all()) else bias_mask.to(dtype),
            prefix_mask=prefix_mask.to(dtype),
            prefix_everywhere=bool(prefix_mask.all()),
        )

    def _after_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        self._active = None  # do not keep the graph or masks alive between calls

    def _site_hook(self, row: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            active = self._active
            if active is None:
                return None
            dtype = output.dtype
            if active.bias is not None:
                bias = active.bias[row].to(dtype)
                output = output + (bias if active.bias_mask is None else active.bias_mask * bias)
            if active.prefix is not None:
                prefix = active.prefix[row].to(dtype)
                output = output + (prefix if active.prefix_everywhere else active.prefix_mask * prefix)
            return output

        return hook

    # ---- restraint ---------------------------------------------------------------------------------------

    def vectors(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in (("bias", self.bias), ("prefix", self.prefix)) if p is not None}

    def gathered(self, modify: bool = False):
        """Whole vectors inside this context, also under DeepSpeed ZeRO-3 where each rank holds a slice.
        With `modify`, rank 0's changes are what every rank keeps."""
        params = list(self.vectors().values())
        if not any(hasattr(p, "ds_id") for p in params):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def norms(self) -> dict[str, torch.Tensor]:
        """Per-layer L2 norms of each vector, {"bias": [L], "prefix": [L]}."""
        with self.gathered():
            return {name: p.detach().float().norm(dim=-1) for name, p in self.vectors().items()}

    def radii(self) -> torch.Tensor | None:
        """Per-layer radius of the restraint ball, or None when unrestrained."""
        cfg = self.config
        if cfg.radius is None:
            return None
        if not cfg.radius_relative:
            return torch.full((len(self.layer_ids),), float(cfg.radius))
        if cfg.site_norms is None:
            raise ConfigError("radius_relative needs site_norms: call steer.calibrate(input_ids, attention_mask) first")
        return float(cfg.radius) * torch.tensor(cfg.site_norms, dtype=torch.float32)

    @torch.no_grad()
    def project(self) -> None:
        """Apply the norm restraint: put each layer's vector back inside its L2 ball (no-op when unrestrained)."""
        radii = self.radii()
        if radii is None:
            return
        with self.gathered(modify=True):
            for p in self.vectors().values():
                norms = p.norm(dim=-1)
                factor = (radii.to(p.device) / norms.clamp_min(1e-12)).clamp(max=1.0)
                p.mul_(factor[:, None])

    def penalty(self) -> torch.Tensor:
        """`config.penalty` x the summed squared norms: an optional soft restraint to add to a loss."""
        total = sum((p.float().pow(2).sum() for p in self.vectors().values()), torch.zeros(()))
        return self.config.penalty * total

    @torch.no_grad()
    def calibrate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[float]:
        """Measure the median output norm of each steered site on real tokens (steering off) and store it in the config."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        layers = decoder_layers(self.model)
        collected: list[torch.Tensor] = [torch.empty(0)] * len(self.layer_ids)

        def recorder(row: int):
            def hook(module, inputs, output):
                collected[row] = output.detach().float().norm(dim=-1)[mask.bool()]

            return hook

        handles = [site_module(layers[i], self.config.site, i).register_forward_hook(recorder(r)) for r, i in enumerate(self.layer_ids)]
        try:
            with self.disabled():
                self.model(input_ids=input_ids, attention_mask=mask)
        finally:
            for h in handles:
                h.remove()
        self.config.site_norms = [float(t.median()) for t in collected]
        return self.config.site_norms

    # ---- save / load ---------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        with self.gathered():
            return {name: p.detach().float().cpu().clone() for name, p in self.vectors().items()}

    def save_pretrained(self, directory: str | Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write steering.safetensors + steering_config.json into `directory`.

        Each file is written beside its destination and renamed into place, so a kill never leaves a
        half-written file; other files in the folder (a trainer's checkpoints) are left alone.
        `tensors`: the output of `state_tensors()` when it was gathered beforehand (ZeRO-3: on every rank).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = tensors if tensors is not None else self.state_tensors()
        tmp = Path(tempfile.mkdtemp(prefix=".steering.tmp-", dir=directory))
        try:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "mode": self.config.mode})
            self.config.to_json_file(tmp / CONFIG_NAME)
            umask = os.umask(0)
            os.umask(umask)
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.chmod(tmp / name, 0o666 & ~umask)  # ordinary file permissions, not the temp folder's
                os.replace(tmp / name, directory / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: nn.Module) -> SteeringVectors:
        """Attach the artifact saved in `directory` to `model`; refuses a model it was not trained for."""
        config, tensors = read_artifact(directory)
        steer = cls.attach(model, config)
        try:
            steer.load_tensors(tensors, source=str(Path(directory) / WEIGHTS_NAME))
        except ArtifactError:
            steer.detach()
            raise
        return steer

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "tensors") -> None:
        expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.vectors().items()}
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if expected != got:
            raise ArtifactError(f"{source}: expected tensors {expected} for mode {self.config.mode!r}, got {got}")
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise ArtifactError(f"{source}: tensor {name!r} holds NaN or inf values")
        with self.gathered(modify=True):
            for name, p in self.vectors().items():
                p.copy_(tensors[name].to(p.device, torch.float32))

    def extra_repr(self) -> str:
        c = self.config
        return f"mode={c.mode}, site={c.site}, layers={len(self.layer_ids)}, dim={self.dim}, prefix_tokens={c.prefix_tokens}, radius={c.radius}"


def _hidden_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point() and not p.requires_grad:  # a base weight, not one of our fp32 vectors
            return p.dtype
    return torch.float32


def read_artifact(directory: str | Path) -> tuple[SteeringConfig, dict[str, torch.Tensor]]:
    """Read and check a saved artifact without a model (used by `brep-rl inspect`)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: steering artifact folder not found")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory}: missing {name} (a steering artifact holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = SteeringConfig.from_json_file(directory / CONFIG_NAME)
    except ConfigError as e:
        raise ArtifactError(str(e)) from None
    try:
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{directory / WEIGHTS_NAME}: corrupt or not a safetensors file ({e})") from None
    return config, tensors


def _output_dim(site: nn.Module, name: str) -> int:
    for attr in ("out_features", "embedding_dim"):
        if isinstance(getattr(site, attr, None), int):
            return getattr(site, attr)
    weight = getattr(site, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    raise ValueError(f"cannot tell the output size of steering site {name!r} ({type(site).__name__}); pick a Linear site")


def _check_matches(config: SteeringConfig, model: nn.Module, dim: int) -> None:
    """A config saved with an artifact names the base it was made for: refuse a model that differs."""
    cfg = model.config
    facts = {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers}
    wrong = [f"{k}: artifact {getattr(config, k)!r}, model {v!r}" for k, v in facts.items() if getattr(config, k) not in (None, v)]
    if wrong:
        raise ArtifactError(
            f"steering vectors made for base {config.base_model!r} do not fit this model "
            f"({getattr(model, 'name_or_path', type(model).__name__)}): " + "; ".join(wrong)
        )
