"""Serving, part 2 of 4: the model replica's work, in plain Python (no HTTP, no Ray).

``Sampler`` holds one loaded checkpoint in eval mode and answers each route with bytes. It runs
in worker threads (part 3 keeps the event loop free), so every method here is synchronous and
takes a ``Deadline`` that it checks between chunks: a timed-out request stops within one chunk.

Memory: the decoder (and encoder) see at most ``chunk`` items per call, sized from the
activation bytes one item costs (measured once at start with forward hooks) and
``ServeArgs.decode_chunk_bytes``; outputs are written into one preallocated tensor.

Non-finite numbers are never answered as 200: for samples and interpolations (no request input
to blame) they are a ``ModelOutputError`` (500); for encode/reconstruct they name ``data`` (422,
the input is outside what the model can map). A checkpoint whose decoder is not finite at its
own component means is refused when the replica starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__, checkpoint, sampling
from .model import Model
from .metrics.modes import mode_groups
from .priors import Components, draw
from .serving_schema import (COMPONENTS_HEADER_LIMIT, MAX_SEED, EncodeRequest, InterpolateRequest, Limits,
                             ReconstructRequest, RequestError, SamplesRequest, ServeArgs, json_safe)


class ModelOutputError(RuntimeError):
    """The model produced NaN/Inf where the request is not to blame: a 500 with a JSON error."""


class WorkTimeout(RuntimeError):
    """A ``Deadline`` passed (or was cancelled) between two chunks."""


@dataclass
class Deadline:
    """When work must stop; ``cancel()`` stops it early (the client went away or timed out)."""

    at: float  # time.monotonic()
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self) -> None:
        if self._cancelled.is_set() or time.monotonic() > self.at:
            raise WorkTimeout("the request ran past its deadline")


NO_DEADLINE = Deadline(math.inf)


# --------------------------------------------------------------------------------------------
# Chunked model calls
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def activation_bytes_per_item(net: nn.Module, example: Tensor) -> int:
    """Bytes one item costs inside ``net``: 3 x the largest leaf-module output (input, output and a
    residual branch alive at once), plus the final output. ``example``: a batch of 2 items."""
    largest = 0

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal largest
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    try:
        out = net(example)
    finally:
        for h in handles:
            h.remove()
    final = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))
    return max(1, (3 * largest + final) // example.shape[0])


def _map_chunks(fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]], x: Tensor, chunk: int,
                deadline: Deadline) -> tuple[Tensor, ...]:
    """``fn`` over ``x`` in chunks of ``chunk`` rows, outputs written into preallocated tensors."""
    outs: list[Tensor] = []
    for i in range(0, x.shape[0], chunk):
        deadline.check()
        part = fn(x[i:i + chunk])
        parts = part if isinstance(part, tuple) else (part,)
        if not outs:
            outs = [torch.empty((x.shape[0], *p.shape[1:]), dtype=p.dtype) for p in parts]
        for o, p in zip(outs, parts):
            o[i:i + p.shape[0]] = p
    return tuple(outs)


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _no_nonfinite_output(x: Tensor, what: str) -> None:
    if not _finite(x):
        raise ModelOutputError(f"model: the decoder returned non-finite values (NaN/Inf) for {what}; the checkpoint's "
                               "weights or prior are broken (see /v1/model for which checkpoint is served)")


def _no_nonfinite_for_input(*ts: Tensor) -> None:
    if not all(_finite(t) for t in ts):
        raise RequestError("data", "the model's output for this input is not finite (the input is far outside the "
                                   "data the model was trained on); allowed inputs in the range of the training data")


def _json(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    payload.clear()  # the Python lists (32 bytes a value) go before the bytes copy is made
    return text.encode()


# --------------------------------------------------------------------------------------------
# The replica's model
# --------------------------------------------------------------------------------------------

@dataclass
class SampleResult:
    x: Tensor  # (n, *data_shape)
    z: Tensor  # (n, D)
    component: Tensor  # (n,)
    seed: int


@dataclass
class Rendered:
    """A response body and how to send it."""

    body: bytes
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


DataModes = dict[int, tuple[Tensor, Tensor]]  # data mode -> (component indices, their sampling probabilities)


def data_mode_table(extra: dict[str, Any], weights: Tensor) -> DataModes | None:
    """Which components stand for each data mode (``metrics.modes.mode_groups`` of the stored
    ``majority_mode`` and test-set ``usage``, the prior weights when the checkpoint has no usage),
    drawn in proportion to their prior weights: the modes that ``modes_covered`` counts. None when
    the checkpoint has no ``majority_mode`` (unlabelled data)."""
    m, majority, usage = weights.numel(), extra.get("majority_mode"), extra.get("usage")
    if majority is None or len(majority) != m:
        return None
    if usage is not None and len(usage) == m:
        u = torch.tensor([-1.0 if v is None else float(v) for v in usage], dtype=torch.float64)
    else:
        u = weights.detach().double()
    table = {}
    for k, members in mode_groups(list(majority), u).items():
        idx = torch.tensor(members, dtype=torch.long)
        w = weights.detach().double()[idx].clamp_min(0)
        table[k] = (idx, w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(idx)))
    return table


def stored_decoder_sigma(state: dict[str, Any], data_shape: tuple[int, ...]) -> float | None:
    """The calibrated decoder sigma that the 2D evaluation stored with the final metrics (checkpoint
    ``extra["metrics"]["decoder_sigma"]``); None for images, for checkpoints without it and for a value
    that is not a finite number >= 0."""
    value = state.get("extra", {}).get("metrics", {}).get("decoder_sigma")
    if len(data_shape) != 1 or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def component_spec(mode: int | list[int] | None, n: int) -> int | Tensor | None:
    """``mode`` of a request as ``Prior.sample``'s ``component``: a list becomes round-robin (n,)."""
    if mode is None or isinstance(mode, int):
        return mode
    return torch.tensor(mode, dtype=torch.long).repeat(math.ceil(n / len(mode)))[:n]


@torch.no_grad()
def sample_many(model: Model, requests: list[SamplesRequest], *, chunk: int = 1 << 30,
                deadline: Deadline = NO_DEADLINE, data_modes: DataModes | None = None,
                components: Components | None = None, decoder_sigma: float | None = None) -> list[SampleResult]:
    """Latents per request from its own seeded generator, then the decoder over all of them in chunks.

    For a single request this is exactly ``sampling.sample(model, n, component=..., seed=...)``; a
    ``data_mode`` request first draws its components from ``data_modes[k]`` with the same generator.
    ``components``: the prior's ``components()``, computed once by a server (the soft-clip and the
    softmax of the weights are otherwise recomputed for every request). A ``decoder_noise`` request
    then gets ``decoder_sigma`` times noise from its own generator (``sampling.sample``'s order).
    """
    comps = components if components is not None else model.prior.components(detach=True)
    draws = []
    for r in requests:
        seed = r.seed if r.seed is not None else secrets.randbelow(MAX_SEED + 1)
        gen = torch.Generator().manual_seed(seed)
        component = component_spec(r.mode, r.n)
        if r.data_mode is not None:
            if data_modes is None or r.data_mode not in data_modes:  # SamplesRequest.check refuses it first
                raise RequestError("data_mode", f"{r.data_mode} is not a data mode of this model")
            members, probs = data_modes[r.data_mode]
            component = members[torch.multinomial(probs, r.n, replacement=True, generator=gen)]
        z, idx = draw(comps, r.n, gen, component, temperature=r.temperature)
        draws.append((z, idx, seed, gen))
    (x,) = _map_chunks(model.decoder, torch.cat([z for z, *_ in draws]), chunk, deadline)  # (sum n, *data_shape)
    _no_nonfinite_output(x, "these samples")
    xs = list(x.split([r.n for r in requests]))
    for i, r in enumerate(requests):
        if r.decoder_noise:
            if decoder_sigma is None:  # SamplesRequest.check refuses it first
                raise RequestError("decoder_noise", "this model has no calibrated decoder sigma; allowed false")
            xs[i] = sampling.add_decoder_noise(xs[i], decoder_sigma, draws[i][3])
    return [SampleResult(xi, z, idx, seed) for xi, (z, idx, seed, _) in zip(xs, draws)]


_MATPLOTLIB = threading.Lock()  # pyplot-free figures, but font caches are shared between threads


def png_bytes(x: Tensor, component: Tensor, num_components: int) -> bytes:
    """2D points (n, 2): a scatter coloured by component (matplotlib Agg); images (n, C, H, W): a grid."""
    if x.dim() > 2:
        from PIL import Image
        from torchvision.utils import make_grid

        grid = make_grid(x.clamp(0.0, 1.0), nrow=math.ceil(math.sqrt(x.shape[0])), padding=2)  # (3, H', W')
        buf = io.BytesIO()
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    if x.shape[-1] != 2:
        raise RequestError("format", f"png draws 2D points or images, not {x.shape[-1]}-D vectors; allowed json, npy, npz")
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global figure state shared between requests

    with _MATPLOTLIB:
        fig = Figure(figsize=(4, 4), dpi=100)
        ax = fig.add_subplot()
        pts, idx = x.numpy(), component.numpy()
        if num_components <= 20:  # qualitative palette: integer index -> its own colour
            colours = colormaps["tab10" if num_components <= 10 else "tab20"](idx)
        else:
            colours = colormaps["hsv"](idx / num_components)
        ax.scatter(pts[:, 0], pts[:, 1], s=4, c=colours, linewidths=0)
        centre, half = (pts.max(0) + pts.min(0)) / 2, max(float((pts.max(0) - pts.min(0)).max()) * 0.55, 1e-3)
        ax.set_xlim(centre[0] - half, centre[0] + half)  # square window: equal scales, fixed image size
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_aspect("equal")
        ax.set_title(f"{len(pts)} samples, {num_components} components", fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def render_samples(res: SampleResult, fmt: str, num_components: int) -> Rendered:
    """json: samples + component; npy: the samples array, components in ``X-Components``; npz: both."""
    headers = {"X-Seed": str(res.seed)}
    if fmt == "json":
        return Rendered(_json({"n": len(res.component), "seed": res.seed, "samples": res.x.tolist(),
                               "component": res.component.tolist()}))
    if fmt == "png":
        return Rendered(png_bytes(res.x, res.component, num_components), "image/png", headers)
    buf = io.BytesIO()
    if fmt == "npz":
        np.savez(buf, samples=res.x.numpy(), component=res.component.numpy(), latents=res.z.numpy())
    else:
        np.save(buf, res.x.numpy())
        components = ",".join(map(str, res.component.tolist()))
        headers["X-Components"] = components if len(components) <= COMPONENTS_HEADER_LIMIT else "omitted; use format=npz"
    return Rendered(buf.getvalue(), "application/octet-stream", headers)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checked(path: str | Path) -> tuple[dict[str, Any], Model]:
    """``checkpoint.load`` + ``restore_model`` (which validates the config, the tensor shapes and that every
    weight is finite before building); every failure is a ``CheckpointError``."""
    state = checkpoint.load(path)
    try:
        _, model = checkpoint.restore_model(state)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"checkpoint: {str(path)!r}: {str(e).removeprefix('checkpoint: ')}") from None
    except Exception as e:  # noqa: BLE001 - missing keys, shape mismatch, bad config: one message
        raise checkpoint.CheckpointError(f"checkpoint: {str(path)!r} cannot be restored ({type(e).__name__}: {e})") from None
    return state, model


class Sampler:
    """One loaded checkpoint: model in eval mode, request limits, one method per route (bytes out)."""

    def __init__(self, model: Model, state: dict[str, Any], args: ServeArgs, *, path: str | Path,
                 sha256: str | None = None):
        self.model = model.eval()  # BatchNorm: running statistics (see service.serving)
        self.state, self.args, self.path = state, args, str(path)
        self.sha256 = sha256 or file_sha256(path)
        self.data_shape = tuple(int(s) for s in state["data_shape"])
        self.components = self.model.prior.components(detach=True)  # fixed while serving: computed once
        self.latent_dim = int(self.components.means.shape[-1])
        self.data_modes = data_mode_table(state.get("extra", {}), self.components.weights)
        self.limits = Limits(args.max_samples, args.max_points, args.max_steps, model.prior.num_components,
                             self.data_shape, args.max_abs_value, args.max_request_bytes,
                             None if self.data_modes is None else tuple(self.data_modes),
                             stored_decoder_sigma(state, self.data_shape))
        per_item = max(activation_bytes_per_item(model.decoder, torch.zeros(2, self.latent_dim)),
                       activation_bytes_per_item(model.encoder, torch.zeros(2, *self.data_shape)))
        self.chunk = max(1, args.decode_chunk_bytes // per_item)  # items per decoder / encoder call
        self._self_test()
        self.started_at = time.time()
        self.batch_stats: dict[str, int] = {"batches": 0, "requests": 0}  # shared with the replica's batch queue

    @classmethod
    def from_checkpoint(cls, path: str | Path, args: ServeArgs, sha256: str | None = None) -> Sampler:
        state, model = load_checked(path)
        return cls(model, state, args, path=path, sha256=sha256)

    @torch.no_grad()
    def _self_test(self) -> None:
        """Refuse a checkpoint whose decoder is not finite at its own component means."""
        means = self.components.means[:64]
        if not (_finite(means) and _finite(self.model.decoder(means))):
            raise checkpoint.CheckpointError(f"checkpoint: {self.path!r}: the decoder is not finite at the prior's "
                                             "component means (NaN/Inf); refusing to serve it")

    # ---- metadata (cheap: answered on the event loop) ----------------------------------------

    def info(self) -> dict[str, Any]:
        config = self.state["config"]
        return {"name": config.get("name"), "dataset": config["data"]["dataset"], "prior": self.model.prior_type,
                "num_components": self.limits.num_components, "latent_dim": self.latent_dim,
                "data_modes": self.data_modes_json(),
                "mode_shares": self.mode_shares_json(),
                "data_shape": list(self.data_shape),
                "decoder_sigma": self.limits.decoder_sigma,
                "metrics": json_safe(self.state.get("extra", {}).get("metrics", {})),
                "checkpoint": {"source": self.args.checkpoint, "path": self.path, "sha256": self.sha256,
                               "iteration": int(self.state["iteration"]),
                               "schema_version": self.state["schema_version"]},
                "serving": {"batching": self.args.batching, "max_batch_size": self.args.max_batch_size,
                            "batch_wait_timeout_s": self.args.batch_wait_timeout_s, "batches": dict(self.batch_stats),
                            "torch_threads": torch.get_num_threads(), "version": __version__,
                            "decode_chunk": self.chunk, "memory": memory_mib(), "pid": os.getpid(),
                            "started_at": self.started_at,
                            "limits": {"max_samples": self.args.max_samples, "max_points": self.args.max_points,
                                       "max_steps": self.args.max_steps, "max_body_bytes": self.args.max_body_bytes,
                                       "max_abs_value": self.args.max_abs_value,
                                       "max_request_bytes": self.args.max_request_bytes,
                                       "max_inflight_bytes": self.args.max_inflight_bytes,
                                       "request_timeout_s": self.args.request_timeout_s,
                                       "max_samples_by_format": {f: min(self.args.max_samples,
                                                                        self.limits.max_items(f))
                                                                 for f in ("json", "npy", "npz", "png")}}}}

    def data_modes_json(self) -> dict[str, list[int]] | None:
        """``data_mode`` -> the components a request for it samples from (JSON keys are strings)."""
        if self.data_modes is None:
            return None
        return {str(k): idx.tolist() for k, (idx, _) in self.data_modes.items()}

    def mode_shares_json(self) -> dict[str, dict[str, float | None]] | None:
        """``data_mode`` -> ``{"prior": share of the prior's samples that land in it, "data": its share of
        the data}`` as measured at evaluation (checkpoint ``extra``; a mode missing from one side has share 0,
        ``data`` is null when the data's shares are unknown); None when it was not measured. Where the
        placement was measured (data in coordinates) each mode also has ``offset`` and ``width``
        (``service.metrics.modes.mode_placement``; null for a mode the prior draws too rarely to place)."""
        extra = self.state.get("extra", {})
        prior, data = extra.get("mode_shares"), extra.get("data_shares")
        if not prior:
            return None
        placed = {name: extra[key] for name, key in (("offset", "mode_offsets"), ("width", "mode_widths"))
                  if isinstance(extra.get(key), dict)}

        def value(table: dict, k: int) -> float | None:
            v = table.get(k)
            return None if v is None else json_safe(float(v))

        return {str(k): {"prior": json_safe(float(prior.get(k, 0.0))),
                         "data": None if data is None else json_safe(float(data.get(k, 0.0)))}
                | {name: value(table, k) for name, table in placed.items()}
                for k in sorted(set(prior) | set(data or {}))}

    @torch.no_grad()
    def modes(self) -> list[dict[str, Any]]:
        """One row per component; ``responsibility_share``/``active``, ``purity``/``majority_mode`` when the
        checkpoint carries them (``extra["usage"]``, ``extra["mode_purity"]``, ``extra["majority_mode"]``)."""
        c = self.components
        extra, m = self.state.get("extra", {}), self.limits.num_components
        per_component = {k: json_safe(extra[k]) for k in ("usage", "mode_purity", "majority_mode")
                         if extra.get(k) is not None and len(extra[k]) == m}
        rows = []
        for i in range(m):
            row = {"index": i, "weight": float(c.weights[i]), "mean": c.means[i].tolist(),
                   "variance": c.logvars[i].exp().tolist()}
            if "usage" in per_component:
                share = per_component["usage"][i]
                row |= {"responsibility_share": share, "active": share is not None and share >= 1e-2}
            if "mode_purity" in per_component:
                row["purity"] = per_component["mode_purity"][i]
            if "majority_mode" in per_component:
                row["majority_mode"] = None if per_component["majority_mode"][i] is None else int(
                    per_component["majority_mode"][i])
            rows.append(row)
        return rows

    # ---- model work (worker threads) -------------------------------------------------------

    def sample_batch(self, requests: list[SamplesRequest], deadline: Deadline = NO_DEADLINE) -> list[SampleResult]:
        return sample_many(self.model, requests, chunk=self.chunk, deadline=deadline, data_modes=self.data_modes,
                           components=self.components, decoder_sigma=self.limits.decoder_sigma)

    def render(self, result: SampleResult, fmt: str, deadline: Deadline = NO_DEADLINE) -> Rendered:
        deadline.check()
        return render_samples(result, fmt, self.limits.num_components)

    def samples(self, r: SamplesRequest, deadline: Deadline = NO_DEADLINE) -> Rendered:
        """Unbatched ``/v1/samples``: sample and render in one call."""
        return self.render(self.sample_batch([r], deadline)[0], r.format, deadline)

    @torch.no_grad()
    def interpolate(self, r: InterpolateRequest, deadline: Deadline = NO_DEADLINE) -> Rendered:
        means = self.components.means
        t = torch.linspace(0.0, 1.0, r.steps)
        z = torch.lerp(means[r.from_mode], means[r.to_mode], t[:, None])  # (steps, D)
        (x,) = _map_chunks(self.model.decoder, z, self.chunk, deadline)
        _no_nonfinite_output(x, "this interpolation")
        deadline.check()
        return Rendered(_json({"t": t.tolist(), "latents": z.tolist(), "samples": x.tolist()}))

    def _encode(self, x: Tensor, deadline: Deadline) -> tuple[Tensor, Tensor, Tensor]:
        return _map_chunks(lambda xi: sampling.encode(self.model, xi), x, self.chunk, deadline)

    def encode(self, r: EncodeRequest, deadline: Deadline = NO_DEADLINE) -> Rendered:
        mu, logvar, resp = self._encode(torch.from_numpy(r.data), deadline)
        _no_nonfinite_for_input(mu, logvar, resp)
        deadline.check()
        return Rendered(_json({"mean": mu.tolist(), "logvar": logvar.tolist(), "responsibilities": resp.tolist(),
                               "component": resp.argmax(-1).tolist()}))

    def reconstruct(self, r: ReconstructRequest, deadline: Deadline = NO_DEADLINE) -> Rendered:
        x = torch.from_numpy(r.data)
        gen = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
        (rec,) = _map_chunks(lambda xi: sampling.reconstruct(self.model, xi, generator=gen, stochastic=r.stochastic),
                             x, self.chunk, deadline)
        _, _, resp = self._encode(x, deadline)
        _no_nonfinite_for_input(rec, resp)
        deadline.check()
        return Rendered(_json({"reconstructions": rec.tolist(), "responsibilities": resp.tolist(),
                               "component": resp.argmax(-1).tolist()}))


def memory_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak (Linux ``/proc``; peak from ``getrusage``)."""
    import resource

    rss = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"rss_mib": round(rss, 1), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
