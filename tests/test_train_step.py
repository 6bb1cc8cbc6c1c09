"""``TrainStep`` on one process, in-process: the step's own work asks the device nothing
(no value read back to the host), for plain text and for chat's token-weighted loss.

On CUDA every such read (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``, ``.cpu()``)
blocks the host until the device catches up; a step without one keeps the launch queue
full. The proxy here counts those calls on CPU tensors during a step."""
import pytest
import torch

from parallel.config import ParallelConfig
from parallel.dims import ParallelDims
from pretrain.model.llama import FAMILY, build_llama
from pretrain.model.llama.args import LlamaArgs
from pretrain.optim import build_optimizer
from pretrain.config import OptimConfig
from pretrain.step import TrainStep

ARGS = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, vocab_size=256)
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_a_step_reads_nothing_back_from_the_device(monkeypatch, chat):
    torch.manual_seed(0)
    model = build_llama(ARGS, rope_cache_len=16, device="cpu")
    model.init_weights(seed=0)
    step = TrainStep(FAMILY, [model], build_optimizer(model, OptimConfig()), dims=ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=1, world_size=1),
                     pc=ParallelConfig(), grad_accum_steps=2, max_norm=0.5, chat=chat,
                     device=torch.device("cpu"), param_dtype=torch.float32)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 4, 17))
    labels = tokens[:, :, 1:].clone()
    if chat:
        labels[:, :, :8] = -100  # only some tokens trained
    batches = [{"input_ids": tokens[i, :, :-1], "labels": labels[i]} for i in range(2)]
    reads, in_optimizer = [], [False]
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _real=real, **k):
            if not in_optimizer[0]:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    # AdamW's step counters are host tensors by design (not capturable): reading them is no
    # device sync on CUDA either, so reads inside optimizer.step are not counted.
    real_step = step.optimizer.step

    def optimizer_step(*a, **k):
        in_optimizer[0] = True
        try:
            return real_step(*a, **k)
        finally:
            in_optimizer[0] = False

    monkeypatch.setattr(step.optimizer, "step", optimizer_step)
    before = [p.detach().clone() for p in model.parameters()]
    out = step(iter(batches), lr=1e-3)
    monkeypatch.undo()
    assert reads == [], reads
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it did update
    assert out.loss_sum.item() > 0 and out.grad_norm.item() > 0.5  # and clipped


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_accumulated_loss_and_grad_norm_equal_torch_cross_entropy(chat):
    """One step of 2 accumulated micro-batches against an independent reference: torch's
    ``cross_entropy`` of the whole batch (chat: ``ignore_index=-100``, the mean over the
    trained tokens, which differ in number between the micro-batches) and the norm of its
    gradient. What the trainer logs (``loss_sum / grad_accum_steps``) and the grad norm must
    equal them: a loss not divided by the micro-batches doubles the gradient (clipping and
    Adam hide it from the losses), a token count that includes -100 positions shrinks the
    chat loss; every layout would share either bug."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_llama(ARGS, rope_cache_len=16, device="cpu")
    model.init_weights(seed=0)
    ref = copy.deepcopy(model)
    step = TrainStep(FAMILY, [model], build_optimizer(model, OptimConfig()), dims=ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=1, world_size=1),
                     pc=ParallelConfig(), grad_accum_steps=2, max_norm=0.0, chat=chat,
                     device=torch.device("cpu"), param_dtype=torch.float32)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 4, 17), generator=torch.Generator().manual_seed(1))
    labels = tokens[:, :, 1:].clone()
    if chat:
        labels[0, :, :13] = -100  # 3 trained tokens per row in the first micro-batch, 12 in the second
        labels[1, :, :4] = -100
    out = step(iter([{"input_ids": tokens[i, :, :-1], "labels": labels[i]} for i in range(2)]), lr=1e-3)
    want = F.cross_entropy(ref(tokens[:, :, :-1].flatten(0, 1)).flatten(0, 1), labels.flatten(), ignore_index=-100)
    want.backward()
    want_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    assert torch.isclose(out.loss_sum / 2, want, rtol=1e-6), (out.loss_sum / 2, want)
    assert torch.isclose(out.grad_norm, want_norm, rtol=1e-5), (out.grad_norm, want_norm)
