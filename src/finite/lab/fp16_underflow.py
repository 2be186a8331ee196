"""fp16-underflow: a float16 language model trained without loss scaling.

The loss of a language model is the mean over every token of the batch, and large runs
use batches of millions of tokens (GPT-3: 3.2 million). The gradient of that mean with
respect to one token's logits is the token's error divided by the token count. Here the
batch holds 2**21 tokens (two million), so at the first step:

* the right character's logit gets (1 - p) / 2**21, about 5e-7: subnormal in float16
  (below its smallest normal number, 2**-14 or 6e-5), kept with three significant bits;
* each of the 53 other characters' logits gets p / 2**21, about 1e-8: below half of
  float16's smallest subnormal (2**-24, 6e-8), so it rounds to zero;
* the output head passes them down multiplied by its weights (about 0.02): below 3e-8,
  zero but for a few. Most gradients of the final LayerNorm, the attention, the MLP and
  the embeddings are exactly zero, the rest subnormal: the backward pass loses all of
  their gradient (with a loss scale of 2**16 it is kept to within a few percent).

So the head learns, from the pull on the right character only (the push on the others is
lost), and as its weights move a trickle of gradient reaches the layers below, all of it
subnormal. In 60 steps the loss creeps from ln 54 = 3.99 down to about 3.3, still above
3.0, the entropy of the text's character frequencies (the best a model that ignores
context can do); the fixed run gets to 2.4.

The fix multiplies the loss by a large power of two before the backward pass (2**22, the
scale ``finite doctor`` suggests for the broken run), so every gradient lands in
float16's normal range with all of its 11 bits, and divides the float32 gradients by it
before the optimizer step: ``finite.LossScaler``. Both runs keep float32 master weights
(``finite.MasterWeights``) and step them with AdamW (AdamW on float16 weights fails
another way: its epsilon, 1e-8, rounds to zero in float16, and a zero gradient gives 0/0),
so the scale is the only difference between them.

A laptop cannot push two million tokens through a model per step: each step here is one
micro-batch of 2048 of them, its mean loss divided by the number of micro-batches in the
batch, as gradient accumulation does. AdamW divides by the gradient's running RMS, so
leaving the other micro-batches out changes the noise of a step, not its size.

References
----------
P. Micikevicius et al., "Mixed Precision Training", ICLR 2018.
T. Brown et al., "Language Models are Few-Shot Learners", NeurIPS 2020 (batch sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finite import LossScaler, MasterWeights, StableStep
from finite.lab._training import monitor
from finite.lab.tiny_lm import TinyLM, text_batches, vocabulary
from finite.monitor import Monitor

NAME = "fp16-underflow"
FAULT = "float16 LM without loss scaling: per-token gradients of ~1e-8 flush to zero"
FIX = "finite.LossScaler(init_scale=2**22), unscaling into float32 MasterWeights"
EXPECTED = "fp16_gradient_underflow"

STEPS = 60
BATCH, CONTEXT = 32, 64
#: Micro-batches of BATCH x CONTEXT = 2048 tokens in the batch whose mean loss is trained
#: (2**21 tokens in all).
MICRO_BATCHES = 1024
LOSS_SCALE = 2.0**22

#: ``batches(step)`` -> ``(inputs, targets)``: token ids of shape (BATCH, CONTEXT).
batches = text_batches(BATCH, CONTEXT)


def build_model() -> TinyLM:
    """The float16 model, seeded: both runs start from the same weights."""
    torch.manual_seed(0)
    return TinyLM(len(vocabulary()), CONTEXT).half()


def mean_loss(model: TinyLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per token of one micro-batch, computed from float32 logits."""
    logits = model(inputs).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def train(fixed: bool) -> Monitor:
    model = build_model()
    master = MasterWeights(model.parameters())
    optimizer = torch.optim.AdamW(master.parameters(), lr=5e-3, betas=(0.9, 0.95))
    scaler = LossScaler(init_scale=LOSS_SCALE) if fixed else None
    step = StableStep(model, optimizer, scaler=scaler, master_weights=master)
    # The optimizer steps the float32 masters, not the model's parameters, so the
    # monitor watches the model (and the scaler) only.
    with monitor(model, None, scaler=scaler) as mon:
        for i in range(STEPS):
            loss = mean_loss(model, *batches(i))
            step(loss / MICRO_BATCHES)  # this micro-batch's share of the batch's mean
            mon.step(loss.detach())  # the loss per token, not this micro-batch's share
    return mon
