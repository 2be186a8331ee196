"""A tiny GPT-2 (built from a config, nothing downloaded) trained 6 steps by the Hugging
Face Trainer on random tokens, two micro-batches of gradient accumulation a step.

Prints ``LOGGED {"loss": [...], "grad_norm": [...]}``: what the Trainer logged itself, one
value per step. Its first argument is the Trainer's output folder (nothing is saved).
"""

import json
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

torch.manual_seed(0)
# bos/eos token ids inside the 64-token vocabulary (GPT-2's are 50256).
config = GPT2Config(
    n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
)
model = GPT2LMHeadModel(config)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, count):
        self.ids = torch.randint(0, 64, (count, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


args = TrainingArguments(
    output_dir=sys.argv[1],
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    max_steps=6,
    learning_rate=1e-3,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(32))
trainer.train()
logged = [entry for entry in trainer.state.log_history if "loss" in entry]
print("LOGGED", json.dumps({key: [e[key] for e in logged] for key in ("loss", "grad_norm")}))
