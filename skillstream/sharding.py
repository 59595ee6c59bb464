"""Sharded training (FSDP2, DeepSpeed ZeRO) chosen by `accelerate launch --config_file`: what a
sharded run refuses, and the whole weights and optimizer state that the main process writes.

Under FSDP2 every parameter is a DTensor holding this process's shard, and under ZeRO-3 a
partition; checkpoints, `experts/NAME`, `model/` and best/final are written by the main process
from whole tensors, so every process first takes part in gathering them (the gathers are
collectives: every process calls these functions, in the same order). Without sharding (one
process, DDP, ZeRO-1/2) the parameters are whole already and nothing is gathered.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .errors import UserError

FSDP, DEEPSPEED = "FSDP", "DEEPSPEED"
# objectives that keep weights outside the model (a reference copy swapped in, a value head):
# FSDP and DeepSpeed shard the model only, so those would be whole on one side and sharded on the other
_OUTSIDE_THE_MODEL = {"dpo", "ppo"}
# plugins whose state is a tensor per weight (EWC's Fisher and anchor), kept whole in checkpoints and
# computed with the parameters: sharded, they would be shards on one side and whole on the other
_PER_WEIGHT_STATE = {"ewc"}


def requested() -> str | None:
    """FSDP or DEEPSPEED when `accelerate launch` was given such a config (it says so in the
    environment of the processes it starts), before any Accelerator exists."""
    for kind in (FSDP, DEEPSPEED):
        if os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true":
            return kind
    return None


def check_recipe(cfg) -> None:
    """The recipes a sharded run cannot train, refused before the run directory is made (one line each)."""
    kind = requested()
    if kind is None:
        return
    if kind == FSDP and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP: fsdp_config.fsdp_version must be 2 (FSDP2, per-parameter sharding; "
                        "see examples/accelerate/fsdp.yaml)")
    if kind == DEEPSPEED and importlib.util.find_spec("deepspeed") is None:
        raise UserError("DeepSpeed: the accelerate config asks for DeepSpeed, which is not installed: "
                        "pip install 'skillstream[deepspeed]'")
    name = "FSDP" if kind == FSDP else "DeepSpeed"
    if cfg.experts is not None:
        raise UserError(f"{name}: the skill stream (experts:) adds each new expert's adapter to the model while it "
                        "runs, after the model was sharded; run it data-parallel (--processes N)")
    stages = cfg.resolved_stages()
    if kind == DEEPSPEED and len(stages) > 1:
        # each stage builds its own optimizer, so its own engine: accelerate ties one DeepSpeed engine to a
        # run, and the second would wrap a model the first has already partitioned (both crash)
        raise UserError(f"DeepSpeed: the recipe trains {len(stages)} stages and DeepSpeed trains one engine per run; "
                        "train one stage, or use FSDP or --processes N")
    for st in stages:
        if st.train.max_batch_tokens is not None:
            # pieces are extra backward passes, as many as each process's batch needs: DeepSpeed steps its engine
            # in every one, FSDP reduces in every one (a process with fewer pieces would leave the others waiting)
            raise UserError(f"{name}: stage {st.name!r} sets train.max_batch_tokens, which cuts batches into a "
                            "varying number of backward passes; leave it null (train.gradient_checkpointing saves "
                            "memory there)")
        if st.objective.name in _OUTSIDE_THE_MODEL:
            raise UserError(f"{name}: stage {st.name!r} objective {st.objective.name} keeps weights outside the "
                            f"model (a reference copy or value head) that {name} does not shard; run it "
                            "data-parallel (--processes N)")
    for plugin in cfg.plugins:
        if plugin.name in _PER_WEIGHT_STATE:
            raise UserError(f"{name}: plugin {plugin.name} keeps a tensor per weight (Fisher and anchor) that "
                            f"{name} would shard; run it data-parallel (--processes N)")
    if cfg.lora is not None and cfg.lora.per_stage:
        raise UserError(f"{name}: lora.per_stage switches the trainable adapter between stages of a sharded "
                        "model; use one adapter (lora.per_stage: false) or --processes N")


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Accelerate turns FSDP on only for GPU-like devices (its state leaves a CPU run as MULTI_CPU,
    plain DDP), while torch's FSDP2 itself shards over gloo on CPU. So where `accelerate launch` asked
    for FSDP on a CPU-only machine, the launch config's plugin is put in place here as Accelerate puts
    it on a GPU: the same prepare, gathers and optimizer state then run on CPU (what the tests
    exercise). Returns whether it did."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if requested() != FSDP or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the launch config (FSDP_* environment variables)
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # as AcceleratorState records it for later instances
    return True


def enable_deepspeed_on_cpu(accelerator) -> bool:
    """As `enable_fsdp_on_cpu`, for DeepSpeed: Accelerate leaves a CPU launch with a DeepSpeed config as
    MULTI_CPU, while DeepSpeed's CPU accelerator (picked where no GPU is found) runs ZeRO over gloo.
    The launch config's plugin is put in place as Accelerate puts it on a GPU, and DeepSpeed's
    communication wraps the gloo process group Accelerate made. Returns whether it did."""
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    if requested() != DEEPSPEED or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # torch's process group exists: DeepSpeed wraps it
    plugin = DeepSpeedPlugin()  # reads the launch config (ACCELERATE_DEEPSPEED_* environment variables)
    plugin.set_mixed_precision(accelerator.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = plugin
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    PartialState().distributed_type = DistributedType.DEEPSPEED
    accelerator.native_amp = False  # DeepSpeed's own bf16 (its config, set above) replaces autocast, as on a GPU
    return True


def check_stage(accelerator, train_cfg) -> None:
    """What a stage needs under DeepSpeed, told to it before the model is prepared."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if train_cfg.grad_accum != 1:  # accelerator.backward steps the DeepSpeed engine on every micro-batch
            raise UserError("DeepSpeed: set train.grad_accum to 1 (raise train.batch_size or processes instead)")
        # no dataloader goes through prepare(), so DeepSpeed is told the batch here (accelerate's own advice)
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=train_cfg.batch_size, gradient_accumulation_steps=1,
            gradient_clipping=train_cfg.max_grad_norm or 0.0)


def is_fsdp(accelerator) -> bool:
    """The model is sharded by FSDP2 (a single process trains unprepared, so whole)."""
    return accelerator is not None and accelerator.is_fsdp2 and accelerator.num_processes > 1


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED


def register_generate(accelerator, model) -> None:
    """After `accelerator.prepare`: under FSDP `model.generate` (evaluation, samples) runs the forward
    passes below the root module, so FSDP is told it is a forward method too (it gathers the root's
    own parameters and sets up its state before it, as it does for `forward`)."""
    if is_fsdp(accelerator):
        from torch.distributed.fsdp import register_fsdp_forward_method
        register_fsdp_forward_method(model, "generate")


def reshard(accelerator, model) -> None:
    """Back to the shards: FSDP leaves the root and the output layers whole after a forward pass with
    no backward (evaluation, generation), and then the model's parameters are not the sharded ones
    the optimizer steps. Every process calls it before gathering."""
    if is_fsdp(accelerator):
        from torch.distributed.fsdp import FSDPModule
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage the model trains under; 0 without DeepSpeed."""
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else 0


def _zero3(accelerator) -> bool:
    return zero_stage(accelerator) == 3


def whole(accelerator, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (parameters and buffers by name) whole and on the CPU, on every process.

    Only the named tensors are gathered: a checkpoint or an adapter folder holds a few MB of
    adapters, where `accelerator.get_state_dict` would gather the whole frozen backbone too (16 GB
    of an 8B model) at every checkpoint."""
    from torch.distributed.tensor import DTensor

    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_fp32_param
        # what trains, from DeepSpeed's fp32 master copy (with bf16 in its config DeepSpeed makes the module
        # itself bf16, while adapters are kept fp32 and a resumed run needs the masters' bits); None elsewhere
        masters = {n: safe_get_full_fp32_param(t) for n, t in tensors.items()}
        rest = [t for n, t in tensors.items() if masters[n] is None]
        if _zero3(accelerator):  # DeepSpeed's own gather of the ZeRO-3 partitions
            import deepspeed
            with deepspeed.zero.GatheredParameters(rest):
                return {n: (t if masters[n] is None else masters[n]).detach().cpu().clone() for n, t in tensors.items()}
        return {n: (t if masters[n] is None else masters[n]).detach().cpu() for n, t in tensors.items()}
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for n, t in tensors.items()}


def model_state(accelerator, model) -> dict[str, torch.Tensor]:
    """The whole model's state dict, whole and on the CPU, for safetensors: tied weights once, under
    the name `safetensors.torch.save_model` keeps (the first in sorted order). Every process calls it."""
    reshard(accelerator, model)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied: dict[int, list[str]] = {}
    for name, p in params.items():
        tied.setdefault(id(p), []).append(name)
    dropped = {n for names in tied.values() for n in sorted(names)[1:]}
    return whole(accelerator, {k: params.get(k, v) for k, v in model.state_dict().items() if k not in dropped})


def adapter_state(accelerator, model) -> dict[str, torch.Tensor]:
    """Every LoRA adapter's weights (frozen experts too), whole and on the CPU. Every process calls it."""
    reshard(accelerator, model)
    return whole(accelerator, {n: p for n, p in model.named_parameters() if "lora_" in n})


ZERO_PARTITIONS = "deepspeed_zero_partitions"  # optimizer.pt's key under DeepSpeed: every process's partition


def optimizer_state(accelerator, model, optimizer) -> dict:
    """The optimizer state a checkpoint holds. FSDP: the whole state keyed by parameter name
    (torch.distributed.checkpoint gathers each process's shard; the main process gets it).
    DeepSpeed: every process's ZeRO partition as DeepSpeed's own optimizer state_dict has it (its fp32
    master weights and the base optimizer's state), in process order, on the main process (the other
    processes get {}). Otherwise the optimizer's own state_dict (DDP: the same on every process)."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        reshard(accelerator, model)
        return get_optimizer_state_dict(model, optimizer.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_deepspeed(accelerator):
        from accelerate.utils import send_to_device
        # on the CPU first: a GPU tensor sent to another process would be unpickled onto its sender's device
        own = send_to_device(optimizer.optimizer.state_dict(), "cpu")
        partitions = [None] * accelerator.num_processes if accelerator.is_main_process else None
        torch.distributed.gather_object(own, partitions, dst=0)
        return {ZERO_PARTITIONS: partitions} if accelerator.is_main_process else {}
    return optimizer.state_dict()


def load_optimizer_state(accelerator, model, optimizer, state: dict) -> None:
    """Put a checkpoint's optimizer state back (after `accelerator.prepare`). FSDP: each process takes
    its shard of the whole state, which every process has read; DeepSpeed: each process takes its own
    partition (DeepSpeed's ZeRO optimizer picks it from the list by rank), the fp32 master weights
    included, so a bf16 run resumes exactly too."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    if is_deepspeed(accelerator):
        optimizer.optimizer.load_state_dict(state[ZERO_PARTITIONS], load_optimizer_states=True,
                                            load_from_fp32_weights=True)
        return
    optimizer.load_state_dict(state)


def checkpoint_classes(zero: int) -> list:
    """The classes besides tensors that optimizer.pt holds in a run trained under ZeRO stage `zero`
    (0: none), which `torch.load(weights_only=True)` is allowed to build (torch.serialization.safe_globals):
    DeepSpeed's ZeRO state_dict carries its loss scaler, its stage and its parameter slice addresses."""
    if not zero:
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]
