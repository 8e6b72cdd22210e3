"""SteeringVectors: fp32 per-layer bias / prefix vectors, attached to a frozen model through hooks (hooks.py).

The module holds the parameters and what the hooks read (enabled, scale, the explicit response start); its
`forward` turns token positions into what the site hooks add, as a module call so that DeepSpeed ZeRO-3 gathers
the vectors around it.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from brep_rl.errors import ArtifactError, ConfigError
from brep_rl.model import freeze
from brep_rl.steering.artifact import (
    WEIGHTS_NAME,
    base_fingerprint,
    check_fits,
    check_tensors,
    read_artifact,
    save_artifact,
)
from brep_rl.steering.config import CONTROL_VECTOR_SITE, SteeringConfig
from brep_rl.steering.hooks import SteeringHooks
from brep_rl.steering.sites import decoder_layers, output_dim, site_module, steered_sites

ATTRIBUTE = "brep_steering"  # the steering module's name inside the model


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
        self.response_start: torch.Tensor | None = None  # set by window(): each row's answer start
        self.last_penalty: torch.Tensor | None = None  # the L2 penalty of the last steered forward with grad
        self._hooks: SteeringHooks | None = None
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
    def attach(cls, model: nn.Module, config: SteeringConfig | None = None, strict: bool = True) -> SteeringVectors:
        """Freeze `model` and hook steering vectors onto it. The vectors become the model's only trainable parameters.
        `config` is copied: the attached vectors record the model's facts in their own copy. A config that names
        its base (a loaded artifact's) must fit `model`; `strict=False` skips the check of its weights."""
        config = copy.deepcopy(config) if config is not None else SteeringConfig()
        if hasattr(model, ATTRIBUTE):
            raise ValueError("this model already has steering vectors attached; call .detach() on them first")
        ids = list(config.layers) if config.layers is not None else list(range(len(decoder_layers(model))))
        sites = steered_sites(model, config.site, ids)
        dim = output_dim(sites[0], config.site)
        check_fits(config, model, strict)

        cfg = model.config
        name = getattr(model, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
        config.hidden_size, config.num_hidden_layers = cfg.hidden_size, cfg.num_hidden_layers
        config.model_type = cfg.model_type
        config.layers = ids
        if strict or config.base_fingerprint is None:  # the weights are this model's: named as it was loaded here
            config.base_model = name or config.base_model
            config.base_fingerprint = base_fingerprint(model)
        else:  # other weights accepted: the artifact keeps naming the base it was made for
            config.base_model = config.base_model or name

        freeze(model)
        device = next(model.parameters()).device
        steer = cls(config, ids, dim).to(device)
        setattr(model, ATTRIBUTE, steer)  # registered submodule: trainers, DDP and DeepSpeed see the parameters
        steer._model_ref = weakref.ref(model)
        steer._hooks = SteeringHooks(steer, model, sites)
        return steer

    def detach(self) -> None:
        """Remove the hooks and the module from the model; the model is the plain base again."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
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
    def restricted(self, layers: Sequence[int] | None) -> Iterator[None]:
        """Steer with `layers` only (None: all of them): the other layers' vectors are zero meanwhile, so every
        backend (hooks, llama.cpp control vectors) sees the ablation. For evaluation, not for training."""
        if layers is None:
            yield
            return
        unknown = sorted(set(layers) - set(self.layer_ids))
        if unknown:
            raise ValueError(f"layers {unknown} are not steered by these vectors (they steer {self.layer_ids})")
        kept = set(layers)
        dropped = [row for row, layer in enumerate(self.layer_ids) if layer not in kept]
        saved = {name: p.detach()[dropped].clone() for name, p in self.vectors().items()}
        with torch.no_grad():
            for p in self.vectors().values():
                p[dropped] = 0
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.vectors().items():
                    p[dropped] = saved[name]

    @contextlib.contextmanager
    def window(self, response_start: torch.Tensor | Sequence[int] | int) -> Iterator[None]:
        """Set each row's response start (column of its first answer token) for plain forwards.

        The prefix vector then covers every real token before `response_start[i] + prefix_tokens`.
        """
        start = torch.as_tensor(response_start, dtype=torch.long).reshape(-1)
        previous, self.response_start = self.response_start, start
        try:
            yield
        finally:
            self.response_start = previous

    @contextlib.contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        """Steer at `scale` times the trained strength (0 = base, 1 = as trained)."""
        previous, self.scale = self.scale, float(scale)
        try:
            yield
        finally:
            self.scale = previous

    def forward(self, valid: torch.Tensor, columns: torch.Tensor, response_start: torch.Tensor) -> tuple:
        """valid [B, T] bool, columns [T] absolute positions, response_start [B] -> what the site hooks add:
        (scaled bias, scaled prefix, bias mask [B, T, 1], prefix mask [B, T, 1]). A tuple of tensors, not an
        object, so that DeepSpeed ZeRO-3 can hook the outputs and re-gather the vectors for the backward pass.
        The L2 penalty is computed here too, where ZeRO-3 has gathered the whole vectors (see penalty_term)."""
        in_window = columns[None, :] < (response_start[:, None] + self.config.prefix_tokens)
        if self.config.penalty and torch.is_grad_enabled():
            self.last_penalty = self.penalty()
        return (
            self.bias * self.scale if self.bias is not None else None,
            self.prefix * self.scale if self.prefix is not None else None,
            valid[..., None],
            (valid & in_window)[..., None],
        )

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
        projected = {}
        with self.gathered(modify=True):
            for name, p in self.vectors().items():
                norms = p.norm(dim=-1)
                factor = (radii.to(p.device) / norms.clamp_min(1e-12)).clamp(max=1.0)
                projected[name] = p.mul_(factor[:, None]).detach().clone()
        for name, p in self.vectors().items():
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # DeepSpeed steps its own fp32 copy and copies it
                from deepspeed.utils import safe_set_full_fp32_param  # back: the projection must reach it too

                safe_set_full_fp32_param(p, projected[name])

    def penalty(self) -> torch.Tensor:
        """`config.penalty` x the summed squared norms: an optional soft restraint to add to a loss."""
        total = sum((p.float().pow(2).sum() for p in self.vectors().values()), torch.zeros(()))
        return self.config.penalty * total

    def penalty_term(self, training: bool) -> torch.Tensor | float:
        """What a trainer adds to its loss: the penalty of the last steered forward, in the autograd graph (also
        under ZeRO-3, where the vectors are whole only inside a forward); 0 when off or not training."""
        term, self.last_penalty = self.last_penalty, None
        return term if training and term is not None else 0.0

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

        sites = [site_module(layers[i], self.config.site, i) for i in self.layer_ids]
        handles = [site.register_forward_hook(recorder(row)) for row, site in enumerate(sites)]
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
        """Write steering.safetensors + steering_config.json into `directory` (atomically, file by file).
        `tensors`: the output of `state_tensors()` when it was gathered beforehand (ZeRO-3: on every rank)."""
        return save_artifact(directory, self.config, tensors if tensors is not None else self.state_tensors())

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: nn.Module, strict: bool = True) -> SteeringVectors:
        """Attach the artifact saved in `directory` to `model`; refuses a model it was not trained for (with
        `strict=False`, one of the same shapes but other weights is accepted)."""
        config, tensors = read_artifact(directory)
        steer = cls.attach(model, config, strict)
        try:
            steer.load_tensors(tensors, source=str(Path(directory) / WEIGHTS_NAME))
        except ArtifactError:
            steer.detach()
            raise
        return steer

    @classmethod
    def from_gguf(cls, path: str | Path, model: nn.Module) -> SteeringVectors:
        """Bias vectors from a llama.cpp control-vector GGUF (written by brep-rl, repeng or cvector-generator)."""
        from brep_rl.steering.gguf import read_control_vector

        hint, vectors = read_control_vector(path)
        model_type = model.config.model_type
        if hint and hint != model_type:
            raise ArtifactError(f"{path}: a control vector for {hint!r} models; this model is {model_type!r}")
        dims = {v.shape[0] for v in vectors.values()}
        if dims != {model.config.hidden_size}:
            raise ArtifactError(f"{path}: vectors of size {sorted(dims)}; this model's layers output {model.config.hidden_size}")
        config = SteeringConfig(mode="bias", site=CONTROL_VECTOR_SITE, layers=list(vectors),
                                provenance={"imported_from": str(path)})
        steer = cls.attach(model, config)
        steer.load_tensors({"bias": torch.from_numpy(np.stack(list(vectors.values())))}, source=str(path))
        return steer

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "tensors") -> None:
        expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.vectors().items()}
        check_tensors(expected, tensors, self.config.mode, source)
        with self.gathered(modify=True):
            for name, p in self.vectors().items():
                p.copy_(tensors[name].to(p.device, torch.float32))

    def extra_repr(self) -> str:
        c = self.config
        return (f"mode={c.mode}, site={c.site}, layers={len(self.layer_ids)}, dim={self.dim}, "
                f"prefix_tokens={c.prefix_tokens}, radius={c.radius}")
