"""All members of the committee trained in one batched forward and backward per step.

The sequential trainer (``training.EnsembleTrainer._epoch``) launches one small MACE
forward/backward per member and batch. On a GPU those kernels are far too small to fill the
device, so M members cost nearly M times one. Here the members' weights are stacked along a new
leading axis and one ``torch.func.vmap`` runs every member on its *own* batch at once; the
optimiser (Adam/AMSGrad with mace_run_train's per-group L2 decay), the gradient-norm clip and the
weight EMA are applied to the stacks with per-member step counts. The arithmetic is the
sequential path's, operation for operation where it matters, so both paths give the same
members to round-off (float64: ~1e-15 relative, measured) and can alternate freely: after a batched call
every member's module, ``torch.optim.Adam`` state and ``torch_ema`` object hold exactly what the
sequential path would have left there.

Why padding. Members train on different frames, so their batches differ in atoms, edges and
graphs, while ``vmap`` needs equal shapes. Each member's batch is padded with dummy atoms (all in
one extra graph, plus empty graphs up to the common graph count) and dummy edges (a dummy atom to
itself, shifted further than ``r_max``: mace's polynomial cutoff is exactly 0 there, so these
edges carry exactly zero messages and zero gradients). The loss masks dummies out and divides by
each member's real counts, so every member's loss, mean denominators included, is mace's
``WeightedEnergyForcesLoss`` on its unpadded batch.

Why patches. mace 0.3.16 and e3nn 0.4.4 are written for plain autograd; three things break under
``torch.func`` and are patched, only inside ``vmappable_mace()`` and restored on exit:

1. mace's ``prepare_graph`` calls ``positions.requires_grad_(True)``, which a functorch-wrapped
   tensor refuses. It is replaced by the same code without that call; the stacked positions
   are made a leaf that requires grad before the ``vmap``, and forces come from one plain
   ``torch.autograd.grad`` of all members' energies with respect to them, outside the ``vmap``
   (the model is called with ``compute_force=False``).
2. mace's ``scatter_sum`` writes into a fresh zero tensor in place (``scatter_add_``), which vmap
   cannot batch when the index differs per member. It is replaced by the out-of-place
   ``scatter_add`` (same sums; every call in the forward passes ``dim_size``).
3. e3nn's spherical harmonics are a TorchScript function, and TorchScript code silently gives
   wrong weight gradients under ``torch.func`` (errors of a few percent). Inside the block the
   plain Python function TorchScript compiled it from is used instead. e3nn's other codegen'd
   modules (linears, tensor products) are TorchScript too and wrong in the same way; they are
   not patched, the batched call runs a twin of the member built without TorchScript instead
   (``eager_template``).

Stress. Batches with stress labels would need the displacement trick (a second derivative with
respect to a per-graph strain) under vmap; the trainer does not use the batched path when a
member's training frames carry stress labels that its loss would weight, and trains those rounds
sequentially instead.

Patches are module attributes: while the block is active, any other thread calling mace in this
process would see them. The trainer is documented as not thread-safe already (no ``predict``
during training), and the block only spans each batched gradient call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mace  # noqa: F401  (first: sets the torch.load switch e3nn needs under torch >= 2.6)
import torch
from torch.func import functional_call, vmap
from torch_ema import ExponentialMovingAverage

from aimspax_like.errors import CampaignInterrupted
from aimspax_like.models.graphs import loader
from aimspax_like.models.torch_utils import quiet_torchscript
from aimspax_like.signals import stop_requested

# ----------------------------------------------------------------------------- patches


def _scatter_sum_out_of_place(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: int | None = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """mace's ``scatter_sum`` without in-place writes (vmap batches ``scatter_add``, not ``_``)."""
    from mace.tools.scatter import _broadcast

    if reduce != "sum":
        raise ValueError(f"only sum is supported, not {reduce}")
    index = _broadcast(index, src, dim)
    if out is None:
        if dim_size is None:  # every call in a MACE forward passes it; a data-dependent size cannot be batched
            raise ValueError("the batched path needs scatter_sum's dim_size")
        size = list(src.size())
        size[dim] = dim_size
        out = torch.zeros(size, dtype=src.dtype, device=src.device)
    return out.scatter_add(dim, index, src)


def _prepare_graph_functional(
    data: dict[str, torch.Tensor],
    compute_virials: bool = False,
    compute_stress: bool = False,
    compute_displacement: bool = False,
    lammps_mliap: bool = False,
) -> Any:
    """mace 0.3.16's ``prepare_graph`` (non-LAMMPS branch) without ``requires_grad_``.

    The stacked positions are already a leaf that requires grad (``MemberStack.gradients``), and
    the in-place flag change is refused on a functorch-wrapped tensor. Stress and virials are not supported here (the
    trainer keeps stress rounds sequential), so neither is the displacement.
    """
    from mace.modules.utils import GraphContext, InteractionKwargs, get_edge_vectors_and_lengths

    if compute_virials or compute_stress or compute_displacement or lammps_mliap:
        raise NotImplementedError("the batched path computes energies and forces only")
    node_heads = data["head"][data["batch"]] if "head" in data else torch.zeros_like(data["batch"])
    positions = data["positions"]
    num_graphs = int(data["ptr"].numel() - 1)
    displacement = torch.zeros((num_graphs, 3, 3), dtype=positions.dtype, device=positions.device)
    vectors, lengths = get_edge_vectors_and_lengths(
        positions=positions, edge_index=data["edge_index"], shifts=data["shifts"]
    )
    return GraphContext(
        is_lammps=False,
        num_graphs=num_graphs,
        num_atoms_arange=torch.arange(positions.shape[0], device=positions.device),
        displacement=displacement,
        positions=positions,
        vectors=vectors,
        lengths=lengths,
        cell=data["cell"],
        node_heads=node_heads,
        interaction_kwargs=InteractionKwargs(None, (0, 0)),
    )


def _eager_spherical_harmonics() -> Any:
    """The Python function e3nn's ``_spherical_harmonics`` was scripted from."""
    from e3nn.o3 import _spherical_harmonics as sh_module

    compiled = sh_module._spherical_harmonics
    eager = getattr(compiled, "_torchdynamo_inline", None)  # set by torch.jit.script on functions
    if eager is None:
        if isinstance(compiled, torch.jit.ScriptFunction):
            raise RuntimeError("cannot find the Python source of e3nn's scripted spherical harmonics")
        eager = compiled  # already plain Python (a later e3nn)
    return eager


@contextlib.contextmanager
def vmappable_mace() -> Iterator[None]:
    """Make a MACE forward usable under ``torch.func`` for the duration of the block.

    See the module docstring for the three patches and why each is needed. Everything is
    restored on exit, errors included.
    """
    import mace.modules.blocks
    import mace.modules.models
    import mace.modules.radial
    import mace.modules.utils
    from e3nn.o3 import _spherical_harmonics as sh_module

    patches: list[tuple[Any, str, Any]] = [
        (mace.modules.models, "prepare_graph", _prepare_graph_functional),
        (sh_module, "_spherical_harmonics", _eager_spherical_harmonics()),
    ]
    for module in (mace.modules.blocks, mace.modules.models, mace.modules.radial, mace.modules.utils):
        if hasattr(module, "scatter_sum"):
            patches.append((module, "scatter_sum", _scatter_sum_out_of_place))
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def eager_template(model: torch.nn.Module) -> torch.nn.Module:
    """A twin of ``model`` without TorchScript: e3nn's codegen modules as plain ``torch.fx``.

    e3nn compiles its generated linears and tensor products with TorchScript, and under
    ``torch.func`` the scripted code gives wrong weight gradients (measured: ~1e-3 relative after
    a few calls, ~3e-2 for the spherical harmonics), with or without the graph executor's
    optimisations. A deepcopy does not help (it reloads the saved TorchScript), so the twin is
    rebuilt from the model's own hyperparameters (mace's ``extract_config_mace_model``, the
    function mace uses to re-create a model) with e3nn's ``jit_script_fx`` off, and given the
    model's weights and buffers. Only its structure and integer buffers are used: each member's
    weights and floating buffers are passed in by ``functional_call``.

    Raises ``ValueError`` when the model cannot be rebuilt this way or the rebuilt twin does not
    take its state exactly (the caller then trains sequentially).
    """
    import e3nn
    from mace.tools.scripts_utils import extract_config_mace_model

    from aimspax_like.models.torch_utils import default_dtype

    config = extract_config_mace_model(model)
    if "error" in config:
        raise ValueError(config["error"])
    config["atomic_numbers"] = [int(z) for z in config["atomic_numbers"]]  # mace re-wraps it in a tensor
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    previous = e3nn.get_optimization_defaults()["jit_script_fx"]
    e3nn.set_optimization_defaults(jit_script_fx=False)
    try:
        with default_dtype(dtype), quiet_torchscript():
            template = type(model)(**config)
    except Exception as error:  # any mace/e3nn version mismatch: no batched path, not a crash
        raise ValueError(f"cannot rebuild {type(model).__name__} without TorchScript: {error}") from error
    finally:
        e3nn.set_optimization_defaults(jit_script_fx=previous)
    template = template.to(device=device, dtype=dtype)
    try:
        template.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"the rebuilt twin does not match the model: {error}") from error
    scripted = [name for name, m in template.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise ValueError(f"TorchScript modules left in the twin: {scripted}")
    for p in template.parameters():
        p.requires_grad_(False)
    return template


# ----------------------------------------------------------------------------- padded batches


@dataclass
class PaddedBatch:
    """One step's batches of all members, padded to common sizes and stacked on axis 0.

    ``graph``: what the MACE forward reads; ``labels``: references and loss weights (zero for
    dummies); ``n_graphs`` [K]: each member's real graphs (0 for a member without a batch this
    step), the energy mean's denominator; ``n_labelled`` [K]: its atoms whose force is a label
    (``force_mask``: a substructure's buffer atoms are not), the force mean's denominator.
    """

    graph: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    n_graphs: torch.Tensor
    n_labelled: torch.Tensor


def pad_batches(batches: Sequence[Any | None], r_max: float, device: torch.device, dtype: torch.dtype) -> PaddedBatch:
    """Stack mace ``Batch`` objects (None: no batch for that member) with dummy padding.

    Every member gets at least one dummy atom (the home of its dummy edges) in a dummy graph of
    weight 0 after its real graphs; further padding graphs are empty.
    """
    real = [b for b in batches if b is not None]
    if not real:
        raise ValueError("no member has a batch")
    n_nodes = max(int(b.num_nodes) for b in real) + 1
    n_edges = max(int(b.edge_index.shape[1]) for b in real)
    n_graphs = max(int(b.num_graphs) for b in real) + 1
    n_elements = int(real[0].node_attrs.shape[1])
    far = 2.0 * float(r_max) + 1.0  # beyond the cutoff: the envelope is exactly zero there
    rows: dict[str, list[torch.Tensor]] = {}
    counts_g, counts_f = [], []

    def add(name: str, value: torch.Tensor) -> None:
        rows.setdefault(name, []).append(value)

    for b in batches:
        g = int(b.num_graphs) if b is not None else 0
        n = int(b.num_nodes) if b is not None else 0
        e = int(b.edge_index.shape[1]) if b is not None else 0
        counts_g.append(g)
        pad_n, pad_e, pad_g = n_nodes - n, n_edges - e, n_graphs - g
        dummy_attrs = torch.zeros(pad_n, n_elements, dtype=dtype)
        dummy_attrs[:, 0] = 1.0
        ptr_tail = torch.full((pad_g,), n_nodes, dtype=torch.long)
        if b is None:
            positions, attrs = torch.zeros(0, 3, dtype=dtype), torch.zeros(0, n_elements, dtype=dtype)
            edges, shifts = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3, dtype=dtype)
            batch_idx, ptr = torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long)
            cell = torch.zeros(0, 3, dtype=dtype)
            energy = weight = e_weight = f_weight = torch.zeros(0, dtype=dtype)
            forces, mask = torch.zeros(0, 3, dtype=dtype), torch.zeros(0, dtype=dtype)
        else:
            b = b.to("cpu")
            positions, attrs = b.positions.to(dtype), b.node_attrs.to(dtype)
            edges, shifts = b.edge_index.long(), b.shifts.to(dtype)
            batch_idx, ptr = b.batch.long(), b.ptr.long()
            cell = b.cell.to(dtype).reshape(-1, 3)
            energy, weight = b.energy.to(dtype), b.weight.to(dtype)
            e_weight, f_weight = b.energy_weight.to(dtype), b.forces_weight.to(dtype)
            forces = b.forces.to(dtype)
            mask = b.force_mask.to(dtype) if hasattr(b, "force_mask") else torch.ones(n, dtype=dtype)
        counts_f.append(float(mask.sum()))
        dummy_edges = torch.full((2, pad_e), n, dtype=torch.long)  # the first dummy atom, to itself
        dummy_shifts = torch.zeros(pad_e, 3, dtype=dtype)
        dummy_shifts[:, 0] = far
        add("positions", torch.cat([positions, torch.zeros(pad_n, 3, dtype=dtype)]))
        add("node_attrs", torch.cat([attrs, dummy_attrs]))
        add("edge_index", torch.cat([edges, dummy_edges], dim=1))
        add("shifts", torch.cat([shifts, dummy_shifts]))
        add("cell", torch.cat([cell, torch.eye(3, dtype=dtype).repeat(pad_g, 1)]))
        add("batch", torch.cat([batch_idx, torch.full((pad_n,), g, dtype=torch.long)]))
        add("ptr", torch.cat([ptr, ptr_tail]))
        add("head", torch.zeros(n_graphs, dtype=torch.long))
        add("energy", torch.cat([energy, torch.zeros(pad_g, dtype=dtype)]))
        add("weight", torch.cat([weight, torch.zeros(pad_g, dtype=dtype)]))
        add("energy_weight", torch.cat([e_weight, torch.zeros(pad_g, dtype=dtype)]))
        add("forces_weight", torch.cat([f_weight, torch.zeros(pad_g, dtype=dtype)]))
        add("forces", torch.cat([forces, torch.zeros(pad_n, 3, dtype=dtype)]))
        add("force_mask", torch.cat([mask, torch.zeros(pad_n, dtype=dtype)]))
    stacked = {name: torch.stack(values).to(device) for name, values in rows.items()}
    stacked["unit_shifts"] = torch.zeros_like(stacked["shifts"])  # only read for stress
    graph_keys = ("positions", "node_attrs", "edge_index", "shifts", "unit_shifts", "cell", "batch", "ptr", "head")
    graph = {key: stacked.pop(key) for key in graph_keys}
    return PaddedBatch(
        graph=graph,
        labels=stacked,
        n_graphs=torch.tensor(counts_g, dtype=dtype, device=device),
        n_labelled=torch.tensor(counts_f, dtype=dtype, device=device),
    )


# ----------------------------------------------------------------------------- loss


def _energies(
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    graph: dict[str, torch.Tensor],
    template: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One member's interaction and total energies per graph (runs under vmap, forward only)."""
    out = functional_call(template, (params, buffers), (graph,), {"training": True, "compute_force": False})
    return out["interaction_energy"], out["energy"]


def _losses(
    energy: torch.Tensor,
    forces: torch.Tensor,
    graph: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    n_graphs: torch.Tensor,
    n_labelled: torch.Tensor,
    weights: tuple[float, float],
) -> torch.Tensor:
    """Every member's ``WeightedEnergyForcesLoss`` on its padded batch, [K] (plain stacked tensors).

    mace: ``w_E * mean_graphs(weight * energy_weight * ((E - E_ref) / n_atoms)^2)
    + w_F * mean_components(weight * forces_weight * (F - F_ref)^2)``; the means here divide by
    the real graph count and the labelled component count (``n_labelled`` atoms, see
    ``models.losses``), dummies and masked buffer atoms carry weight 0.
    """
    ptr = graph["ptr"]
    atoms_per_graph = (ptr[:, 1:] - ptr[:, :-1]).to(energy.dtype).clamp(min=1.0)  # empty padding graphs
    e_w = labels["weight"] * labels["energy_weight"]
    e_sum = (e_w * torch.square((labels["energy"] - energy) / atoms_per_graph)).sum(dim=1)
    per_graph = labels["weight"] * labels["forces_weight"]
    f_w = (torch.gather(per_graph, 1, graph["batch"]) * labels["force_mask"]).unsqueeze(-1)
    f_sum = (f_w * torch.square(labels["forces"] - forces)).sum(dim=(1, 2))
    energy_term = e_sum / n_graphs.clamp(min=1.0)
    forces_term = f_sum / (3.0 * n_labelled).clamp(min=1.0)
    return weights[0] * energy_term + weights[1] * forces_term


# ----------------------------------------------------------------------------- stacked state


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """The batched step reimplements ``torch.optim.Adam``'s default single-tensor update only."""
    if type(optimizer) is not torch.optim.Adam:
        raise TypeError(f"the batched path mimics torch.optim.Adam, not {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        flags = {k: group.get(k) for k in ("maximize", "capturable", "differentiable", "fused",
                                           "decoupled_weight_decay")}
        if any(flags.values()):
            raise ValueError(f"unsupported Adam options for the batched path: {flags}")
        if isinstance(group["lr"], torch.Tensor):
            raise ValueError("the batched path needs a float learning rate")


class MemberStack:
    """Raw weights, Adam moments and EMA shadows of K members as stacked tensors.

    Built from the members' modules (which must hold their raw weights), their ``torch.optim.Adam``
    and ``torch_ema`` objects; ``write_back`` puts everything back in those objects' own formats.
    """

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        emas: Sequence[ExponentialMovingAverage | None],
    ) -> None:
        self.models, self.optimizers, self.emas = list(models), list(optimizers), list(emas)
        for opt in self.optimizers:
            check_optimizer(opt)
        if len({ema is None for ema in self.emas}) > 1:
            raise ValueError("either all members have an EMA or none has")
        self.names = [name for name, _ in self.models[0].named_parameters()]
        members_params = [list(m.parameters()) for m in self.models]
        self.member_params = members_params
        with torch.no_grad():
            self.params = [torch.stack([ps[i].detach() for ps in members_params]).clone()
                           for i in range(len(self.names))]
        floating = [(n, b) for n, b in self.models[0].named_buffers() if b.is_floating_point()]
        self.buffer_names = [n for n, _ in floating]
        buffers = [dict(m.named_buffers()) for m in self.models]
        self.buffers = {n: torch.stack([b[n] for b in buffers]) for n in self.buffer_names}
        # Per parameter: [K] hyperparameters and Adam state (step counts as float64 on the host).
        k_range = range(len(self.models))
        group_of = [{id(p): g for g in opt.param_groups for p in g["params"]} for opt in self.optimizers]
        self.amsgrad = {bool(g["amsgrad"]) for opt in self.optimizers for g in opt.param_groups}
        if len(self.amsgrad) != 1:
            raise ValueError("members disagree on amsgrad")
        self.amsgrad = self.amsgrad.pop()
        self.hyper: list[dict[str, torch.Tensor]] = []
        self.steps: list[list[float]] = []
        self.exp_avg, self.exp_avg_sq, self.max_exp_avg_sq = [], [], []
        for i, stack in enumerate(self.params):
            groups = [group_of[k][id(members_params[k][i])] for k in k_range]
            self.hyper.append({
                "lr": [float(g["lr"]) for g in groups],
                "beta1": [float(g["betas"][0]) for g in groups],
                "beta2": [float(g["betas"][1]) for g in groups],
                "eps": [float(g["eps"]) for g in groups],
                "weight_decay": [float(g["weight_decay"]) for g in groups],
            })
            states = [self.optimizers[k].state.get(members_params[k][i], {}) for k in k_range]
            self.steps.append([float(s["step"]) if "step" in s else 0.0 for s in states])

            def moment(name: str, states: list = states, stack: torch.Tensor = stack) -> torch.Tensor:
                return torch.stack([s[name].detach() if name in s else torch.zeros_like(stack[0])
                                    for s in states]).clone()

            self.exp_avg.append(moment("exp_avg"))
            self.exp_avg_sq.append(moment("exp_avg_sq"))
            self.max_exp_avg_sq.append(moment("max_exp_avg_sq") if self.amsgrad else None)
        if self.emas[0] is not None:
            self.shadow = [torch.stack([ema.shadow_params[i].detach() for ema in self.emas]).clone()
                           for i in range(len(self.names))]
            self.ema_updates = [ema.num_updates for ema in self.emas]
        else:
            self.shadow, self.ema_updates = None, []

    def __len__(self) -> int:
        return len(self.models)

    # ------------------------------------------------------------------ one step

    def gradients(
        self, padded: PaddedBatch, template: torch.nn.Module, weights: tuple[float, float]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-member loss gradients (stacked like ``params``) and losses [K].

        Only the forward runs under ``vmap``; forces and weight gradients come from plain
        autograd through the batched forward's (physical, stacked) operations. Members do not
        interact, so the gradient of the summed losses with respect to member k's weights is
        member k's own. Measured on CPU this is 15-20% faster per step than
        ``vmap(grad_and_value(...grad(energy)...))``: each op then passes through one functorch
        layer in the forward and none in the two backward passes, instead of three.
        """
        with torch.enable_grad(), vmappable_mace():
            leaves = [p.detach().requires_grad_(True) for p in self.params]
            graph = dict(padded.graph)
            positions = graph["positions"].detach().requires_grad_(True)
            graph["positions"] = positions
            interaction, energy = vmap(_energies, in_dims=(0, 0, 0, None))(
                dict(zip(self.names, leaves, strict=True)), self.buffers, graph, template)
            (gradient,) = torch.autograd.grad(interaction.sum(), positions, create_graph=True)
            losses = _losses(energy, -gradient, graph, padded.labels, padded.n_graphs, padded.n_labelled, weights)
            # A weight the loss does not reach gets a zero gradient, as under torch.func.
            grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True, materialize_grads=True)
        return list(grads), losses.detach()

    def step(self, grads: list[torch.Tensor], active: torch.Tensor, clip: float | None) -> None:
        """Clip, Adam(AMSGrad) and EMA for the ``active`` members ([K] bool); others untouched."""
        active_list = [bool(a) for a in active.tolist()]
        with torch.no_grad():
            if clip is not None:
                grads = _clip_per_member(grads, clip)
            # Members' hyperparameters and step counts mostly repeat across tensors: one [K]
            # tensor per distinct list of values and dtype per step (no host-to-device copy each).
            constants: dict[tuple, torch.Tensor] = {}
            for i, p in enumerate(self.params):
                self._adam(i, p, grads[i], active, active_list, constants)
            if self.shadow is not None:
                self._ema(active, active_list)

    def _adam(self, i: int, param: torch.Tensor, grad: torch.Tensor, active: torch.Tensor,
              active_list: list[bool], constants: dict[tuple, torch.Tensor]) -> None:
        """``torch.optim.adam._single_tensor_adam`` per member, with [K] hyperparameters."""
        hyper = self.hyper[i]
        steps = self.steps[i]
        for k, on in enumerate(active_list):
            if on:
                steps[k] += 1.0
        # Per-member scalars in Python floats, as Adam computes them, then one [K] tensor each.
        bc1 = [1 - b**max(s, 1.0) for b, s in zip(hyper["beta1"], steps, strict=True)]
        bc2 = [1 - b**max(s, 1.0) for b, s in zip(hyper["beta2"], steps, strict=True)]
        step_size = [lr / c for lr, c in zip(hyper["lr"], bc1, strict=True)]
        bc2_sqrt = [c**0.5 for c in bc2]

        def per_member(values: list[float]) -> torch.Tensor:
            key = (tuple(values), param.dtype)
            if key not in constants:
                constants[key] = torch.tensor(values, dtype=param.dtype, device=param.device)
            return constants[key].view((len(values),) + (1,) * (param.dim() - 1))

        mask = active.view((-1,) + (1,) * (param.dim() - 1))
        if any(hyper["weight_decay"]):
            grad = grad + per_member(hyper["weight_decay"]) * param
        exp_avg = torch.lerp(self.exp_avg[i], grad, per_member([1 - b for b in hyper["beta1"]]))
        exp_avg_sq = self.exp_avg_sq[i] * per_member(hyper["beta2"]) + per_member(
            [1 - b for b in hyper["beta2"]]) * grad * grad
        if self.amsgrad:
            max_sq = torch.maximum(self.max_exp_avg_sq[i], exp_avg_sq)
            denom = (max_sq.sqrt() / per_member(bc2_sqrt)) + per_member(hyper["eps"])
            self.max_exp_avg_sq[i] = torch.where(mask, max_sq, self.max_exp_avg_sq[i])
        else:
            denom = (exp_avg_sq.sqrt() / per_member(bc2_sqrt)) + per_member(hyper["eps"])
        updated = param + per_member([-s for s in step_size]) * exp_avg / denom
        self.params[i] = torch.where(mask, updated, param)
        self.exp_avg[i] = torch.where(mask, exp_avg, self.exp_avg[i])
        self.exp_avg_sq[i] = torch.where(mask, exp_avg_sq, self.exp_avg_sq[i])

    def _ema(self, active: torch.Tensor, active_list: list[bool]) -> None:
        """``torch_ema``'s update, ``s -= (1 - d) * (s - p)`` with its warm-up
        ``d = min(decay, (1 + n) / (10 + n))`` when it counts updates."""
        factors = []
        for k, on in enumerate(active_list):
            decay = self.emas[k].decay
            if on and self.ema_updates[k] is not None:
                self.ema_updates[k] += 1
                decay = min(decay, (1 + self.ema_updates[k]) / (10 + self.ema_updates[k]))
            factors.append(1.0 - decay)
        per_dtype: dict[torch.dtype, torch.Tensor] = {}
        for i, shadow in enumerate(self.shadow):
            shape = (len(factors),) + (1,) * (shadow.dim() - 1)
            if shadow.dtype not in per_dtype:
                per_dtype[shadow.dtype] = torch.tensor(factors, dtype=shadow.dtype, device=shadow.device)
            factor = per_dtype[shadow.dtype].view(shape)
            updated = shadow - (shadow - self.params[i]) * factor
            self.shadow[i] = torch.where(active.view(shape), updated, shadow)

    # ------------------------------------------------------------------ back into the members

    def write_back(self) -> None:
        """Raw weights into the modules, moments into each Adam's state, shadows into each EMA."""
        from torch.optim.optimizer import _get_scalar_dtype

        with torch.no_grad():
            for k, (params, opt) in enumerate(zip(self.member_params, self.optimizers, strict=True)):
                for i, p in enumerate(params):
                    p.copy_(self.params[i][k])
                    if self.steps[i][k] == 0.0:
                        continue  # never stepped: Adam has no state for it either
                    state = opt.state[p]
                    step = state.get("step")
                    if step is None:
                        step = torch.tensor(0.0, dtype=_get_scalar_dtype())
                    step.fill_(self.steps[i][k])
                    state["step"] = step
                    state["exp_avg"] = self.exp_avg[i][k].clone()
                    state["exp_avg_sq"] = self.exp_avg_sq[i][k].clone()
                    if self.amsgrad:
                        state["max_exp_avg_sq"] = self.max_exp_avg_sq[i][k].clone()
                if self.shadow is not None:
                    ema = self.emas[k]
                    for i, s in enumerate(ema.shadow_params):
                        s.copy_(self.shadow[i][k])
                    ema.num_updates = self.ema_updates[k]


def _clip_per_member(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """``clip_grad_norm_`` per member: the norm over all of a member's gradients, scaled by
    ``min(1, max_norm / (norm + 1e-6))``."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1)  # [K, P]
    total = torch.linalg.vector_norm(norms, dim=1)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * coef.view((-1,) + (1,) * (g.dim() - 1)) for g in grads]


# ----------------------------------------------------------------------------- epochs


def train_epochs(
    stack: MemberStack,
    template: torch.nn.Module,
    graphs: Sequence[Sequence[Any]],
    generators: Sequence[torch.Generator],
    epochs: int,
    batch_size: int,
    weights: tuple[float, float],
    clip: float | None,
    r_max: float,
) -> list[float]:
    """``epochs`` epochs of every member in lock-step; the graph-weighted mean batch loss of
    each member's last epoch.

    Member k draws its batches exactly as the sequential epoch does, ``loader(graphs[k],
    batch_size, shuffle=True, generator=generators[k])`` once per epoch, and runs through its
    epochs back to back: a member with fewer batches simply finishes early (it is masked out,
    not updated, for the remaining steps). The caller writes the stack back (``write_back``),
    also when this raises ``CampaignInterrupted``.
    """
    k_members = len(stack)
    device = stack.params[0].device
    dtype = stack.params[0].dtype

    def stream(k: int) -> Iterator[tuple[int, Any]]:
        for epoch in range(epochs):
            for batch in loader(graphs[k], batch_size, shuffle=True, generator=generators[k]):
                yield epoch, batch

    streams = [stream(k) for k in range(k_members)]
    totals, counts = [0.0] * k_members, [0] * k_members
    last_epoch = [0] * k_members
    while True:
        items = [next(s, None) for s in streams]
        if all(item is None for item in items):
            break
        signum = stop_requested()
        if signum:
            raise CampaignInterrupted(signum)
        batches = [item[1] if item is not None else None for item in items]
        for k, item in enumerate(items):
            if item is not None and item[0] != last_epoch[k]:  # a new epoch: its loss starts afresh
                last_epoch[k], totals[k], counts[k] = item[0], 0.0, 0
        padded = pad_batches(batches, r_max, device, dtype)
        active = torch.tensor([b is not None for b in batches], device=device)
        grads, losses = stack.gradients(padded, template, weights)
        stack.step(grads, active, clip)
        for k, (b, loss) in enumerate(zip(batches, losses.tolist(), strict=True)):
            if b is not None:
                totals[k] += loss * b.num_graphs
                counts[k] += b.num_graphs
    return [t / c if c else math.nan for t, c in zip(totals, counts, strict=True)]
