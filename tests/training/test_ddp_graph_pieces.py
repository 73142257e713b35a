"""Under DDP, dynamo cuts a compiled step at every gradient bucket (so that each bucket's all-reduce can start
during the backward), and each piece is compiled, and under CUDA graphs replayed, on its own.  The speed plan's
default for a step with CUDA graphs is one bucket for all gradients: counted here on the CPU (gloo, one rank), it
leaves a few pieces where torch's bucket sizes leave one per bucket."""
import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounter
from torch.nn.parallel import DistributedDataParallel as DDP

from ditkit.fast import TrainRun, recipes, train_speed
from ditkit.models.dit import DiT


def pieces(model: torch.nn.Module, bucket_mb: float | None) -> int:
    """The graphs dynamo compiles for one loss of ``model`` (under DDP with ``bucket_mb`` MiB buckets, or bare)."""
    torch._dynamo.reset()
    net = model if bucket_mb is None else DDP(model, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)
    count = CompileCounter()
    step = torch.compile(lambda x, t, y: net(x, t, y).square().mean(), backend=count)
    step(torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))).backward()
    return count.frame_count


def test_one_bucket_keeps_a_compiled_step_in_a_few_pieces(monkeypatch):
    monkeypatch.setattr(recipes, "fp8_tensor_cores", lambda device: True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=256, depth=6, num_heads=4, num_classes=10)
        plan = train_speed("fastest", TrainRun(torch.device("cuda"), torch.bfloat16, world_size=8, parallel="ddp"))
        one_bucket, said = plan.ddp_bucket_mb(model, None)
        assert one_bucket > sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20 and said
        bare, small, default, planned = pieces(model, None), pieces(model, 1.0), pieces(model, 25.0), pieces(model, one_bucket)
        assert bare == 1 and small >= 20 and planned <= 3 and planned < default < small  # 28 MiB of float32 weights
    finally:
        dist.destroy_process_group()
