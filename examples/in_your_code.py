"""finite in your own training loop: a float16 language model, protected and watched.

A tiny causal transformer is trained in float16 on a synthetic token stream with the pieces of
finite a real loop would use:

* ``finite.ops.cross_entropy`` from logits, with a z-loss, accumulated in float32;
* ``finite.MasterWeights``: float32 weights for the optimizer, float32 gradient sums;
* ``finite.LossScaler``: float16 gradients lifted above underflow, inf steps skipped;
* ``finite.StableStep``: scale, backward, accumulate, unscale and clip in one pass,
  step or skip, scheduler only when the optimizer stepped;
* ``finite.Monitor``: per-layer statistics, read every ``sync_every`` steps;
* ``finite.diagnose``: what the monitor saw, as findings.

Run it with ``python examples/in_your_code.py`` (a few seconds on a laptop CPU). It
prints the steps taken and skipped, the clipping, the scale, and the findings.
"""

from __future__ import annotations

import torch
from torch import nn

import finite

VOCAB, CONTEXT, WIDTH = 64, 32, 32


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(
            WIDTH, nhead=4, dim_feedforward=4 * WIDTH, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        hidden = self.blocks(self.embed(tokens), mask=causal.to(self.head.weight.dtype))
        return self.head(hidden)


def markov_text(length: int) -> torch.Tensor:
    """Tokens where each one mostly follows from the previous: something to learn."""
    generator = torch.Generator().manual_seed(1)
    noise = torch.randint(0, VOCAB, (length,), generator=generator)
    keep = torch.rand(length, generator=generator) < 0.8
    tokens = [0]
    for i in range(1, length):
        tokens.append((5 * tokens[-1] + 3) % VOCAB if keep[i] else int(noise[i]))
    return torch.tensor(tokens)


def main() -> None:
    torch.manual_seed(0)
    model = TinyLM().half()
    master = finite.MasterWeights(model.parameters())
    optimizer = torch.optim.AdamW(master.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    scaler = finite.LossScaler(init_scale=2.0**16)
    monitor = finite.Monitor(model, scaler=scaler, precision="float16", sync_every=10)
    step = finite.StableStep(
        model,
        optimizer,
        scaler=scaler,
        clip=1.0,
        monitor=monitor,
        master_weights=master,
        accumulation_steps=2,
        scheduler=scheduler,
    )
    data = markov_text(4096)
    for i in range(40):
        start = torch.randint(0, data.numel() - CONTEXT - 1, (8,))
        window = torch.stack([data[s : s + CONTEXT + 1] for s in start.tolist()])
        logits = model(window[:, :-1])
        loss = finite.ops.cross_entropy(
            logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1), z_loss=1e-4
        )
        result = step(loss)
        if result.stepped or result.skip_reason is not None:
            # Reading the device tensors of the result is a host sync: done here only to
            # print, every tenth micro-batch.
            if i % 10 == 9 or result.skip_reason is not None:
                print(
                    f"micro-batch {i + 1:2d}: loss {result.loss.item():.3f}, "
                    f"grad norm {result.grad_norm.item():.3f}"
                    f"{' (clipped)' if result.clipped.item() else ''}, "
                    f"scale {result.scale.item():.0f}"
                    f"{', skipped: ' + result.skip_reason if result.skip_reason else ''}"
                )
    monitor.close()

    print(
        f"optimizer steps {step.optimizer_steps}, skipped {step.skipped_steps}, "
        f"final scale {scaler.get_scale():.0f}"
    )
    findings = finite.diagnose(monitor)
    finite.print_findings(findings)


if __name__ == "__main__":
    main()
