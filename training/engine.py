"""Engines: how one optimisation step runs. Both present the same small interface to the trainer.

    SingleEngine      one process, CPU or one GPU, torch AdamW, autocast for bf16/fp16.
    DeepSpeedEngine   several processes (torchrun or the deepspeed launcher), ZeRO stage 1/2/3.

Both keep fp32 weights and use autocast for bf16/fp16, so the maths and the checkpoint dtypes are the
same whichever engine runs: the WKV recurrence and every elementwise op (the decay exp(-exp(w))
included) stay fp32 and only the matmuls run in 16 bits. Checkpoints are written in the --precision
dtype (fp32 for fp32/tf32).
"""
from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rwkvc.errors import RwkvcError
from rwkvc.training.model import LMLoss, param_groups

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
SAVE_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16, AMX or Arm's BF16). Without it, torch
    emulates bf16 matmuls: the demo's step measured 26 s against 1.5 s in fp32 on an AVX2-only EPYC."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # a torch without the probe: the CPU's flags
        from rwkvc.host import cpu_flags
        return bool(set(cpu_flags().split()) & {"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (from torchrun / deepspeed launcher environment variables)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @staticmethod
    def from_env(local_rank_flag: int = -1) -> "Dist":
        def number(name: str, default: int, least: int) -> int:
            text = os.environ.get(name, str(default))
            try:
                value = int(text)
            except ValueError:
                value = least - 1
            if value < least:
                raise RwkvcError(f"environment variable {name}={text!r}: must be an integer >= {least} "
                                 "(torchrun and the deepspeed launcher set it)")
            return value
        world = number("WORLD_SIZE", 1, 1)
        rank = number("RANK", 0, 0)
        local = number("LOCAL_RANK", local_rank_flag if local_rank_flag >= 0 else 0, 0)
        return Dist(rank=rank, world=world, local_rank=local)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keep_freed_memory():
    """CPU training frees and re-allocates the same large buffers every step (the head's logits chunk,
    the embedding gradient, optimizer temporaries). glibc returns such blocks to the OS and page-faults
    them back in each time, which on the demo cost a third of the step in kernel time. Raising glibc's
    mmap and trim thresholds keeps them in the heap for reuse. Linux/glibc only; a no-op elsewhere."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def make_optimizer(model, args, device, fused: bool = False):
    kw = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps)
    if fused and device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr_init, **kw)


class SingleEngine:
    name = "single"

    def __init__(self, wrapper: LMLoss, args, device: torch.device, dist_info: Dist):
        if device.type == "cpu":
            keep_freed_memory()
        self.wrapper = wrapper.to(device)
        self.device = device
        self.dist = dist_info
        self.precision = args.precision
        self.grad_clip = args.grad_clip
        self.optimizer = make_optimizer(wrapper.model, args, device, fused=True)
        self.scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None

    @property
    def model(self):
        return self.wrapper.model

    def autocast(self):
        dt = AUTOCAST.get(self.precision)
        return torch.autocast(device_type=self.device.type, dtype=dt) if dt is not None else nullcontext()

    def set_lr(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def train_step(self, idx: torch.Tensor, targets: torch.Tensor) -> float:
        self.wrapper.train()
        with self.autocast():
            loss = self.wrapper(idx.to(self.device), targets.to(self.device))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.wrapper.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def eval_loss_sum(self, idx: torch.Tensor, targets: torch.Tensor) -> float:
        self.wrapper.eval()
        with self.autocast():
            return self.wrapper(idx.to(self.device), targets.to(self.device), reduction="sum").item()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def barrier(self):
        pass

    def weights(self) -> dict | None:
        """The official-format state_dict in the checkpoint dtype (on rank 0; None elsewhere)."""
        dt = SAVE_DTYPE[self.precision]
        return {k: v.detach().to("cpu", dt).clone() for k, v in self.model.state_dict().items()}

    def master_weights(self) -> dict | None:
        """fp32 weights when the checkpoint is 16-bit (so a resume loses nothing), else None."""
        if SAVE_DTYPE[self.precision] == torch.float32:
            return None
        return {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}

    def save_state(self, proj_dir: str, tag: str) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "master": self.master_weights()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state(self, proj_dir: str, state: dict, weights: dict):
        self.model.load_state_dict(state.get("master") or weights)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def close(self):
        pass


class DeepSpeedEngine(SingleEngine):
    """ZeRO 1/2/3 over torch.distributed (NCCL on GPUs, gloo on CPU)."""
    name = "deepspeed"

    def __init__(self, wrapper: LMLoss, args, device: torch.device, dist_info: Dist):
        try:
            import deepspeed
        except ImportError:
            raise RwkvcError(f"--strategy {args.strategy} needs DeepSpeed (`pip install deepspeed`)") from None
        self.ds = deepspeed
        self.device = device
        self.dist = dist_info
        self.precision = args.precision
        self.stage = int(args.strategy.rsplit("_", 1)[1])
        if args.precision == "fp16":
            raise RwkvcError("--precision fp16 is not supported with DeepSpeed here; use bf16")
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        bucket = int(args.ds_bucket_mb * 1e6)
        config = {
            "train_micro_batch_size_per_gpu": args.micro_bsz,
            "gradient_accumulation_steps": getattr(args, "accumulation", 1),   # GRPO: micro-batches per step
            "gradient_clipping": args.grad_clip,
            "zero_optimization": {"stage": self.stage, "allgather_bucket_size": bucket, "reduce_bucket_size": bucket},
            "steps_per_print": 1 << 62,
            "wall_clock_breakdown": False,
        }
        self.scaler = None
        self.grad_clip = args.grad_clip
        if device.type == "cpu":
            keep_freed_memory()
        wrapper = wrapper.to(device)
        optimizer = make_optimizer(wrapper.model, args, device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=config)
        self.wrapper = self.engine.module

    def set_lr(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def train_step(self, idx, targets) -> float:
        self.engine.train()
        with self.autocast():
            loss = self.engine(idx.to(self.device), targets.to(self.device))
        self.engine.backward(loss)
        self.engine.step()
        return self.all_reduce_sum([loss.item()])[0] / self.dist.world  # the mean over all processes

    @torch.no_grad()
    def eval_loss_sum(self, idx, targets) -> float:
        self.engine.eval()
        with self.autocast():
            return self.engine(idx.to(self.device), targets.to(self.device), reduction="sum").item()

    def all_reduce_sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        dist.barrier()

    def _gathered(self):
        params = list(self.model.parameters())
        if self.stage == 3:
            return self.ds.zero.GatheredParameters(params, modifier_rank=None)
        return nullcontext()

    def weights(self):
        with self._gathered():
            if self.dist.rank != 0:
                return None
            dt = SAVE_DTYPE[self.precision]
            return {k: v.detach().to("cpu", dt).clone() for k, v in self.model.state_dict().items()}

    def save_state(self, proj_dir: str, tag: str) -> dict:
        # every rank writes its optimizer partition (and the fp32 weights) under proj_dir/rwkv-<tag>.ds/
        self.engine.save_checkpoint(proj_dir, tag=f"rwkv-{tag}.ds", save_latest=False)
        return {"ds_tag": f"rwkv-{tag}.ds"}

    def load_state(self, proj_dir: str, state: dict, weights: dict):
        path, _ = self.engine.load_checkpoint(proj_dir, tag=state["ds_tag"], load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RwkvcError(f"DeepSpeed state {proj_dir}/{state['ds_tag']} could not be loaded")

    def close(self):
        if dist.is_initialized():
            dist.barrier()
