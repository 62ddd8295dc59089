"""Where a trained shapes run stands on each question type, read from inside the model (README "Results").

    bash scripts/venv-run python scripts/probe_answers.py --checkpoint runs/results-shapes-tiny-full [--shards 2]

For every answer of every turn of the first ``--shards`` training shards (the conversations the model was trained
on), teacher-forced:

- ``teacher-forced``: the share of answers whose every token is the model's top prediction, per question type;
- ``probe``: for the yes/no types (existence, position), the held-out accuracy of a logistic-regression probe on the
  hidden state that predicts the yes/no token, at every layer (embeddings first, 70/30 split). A probe at chance in
  every layer means the answer is nowhere in the residual stream: the model has not computed it, as opposed to
  computing it and failing to say it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import webdataset as wds

from skipvision.adapters import decoder_layers
from skipvision.data.collate import collate
from skipvision.data.pipeline import SampleEncoder
from skipvision.data.tokenizer import IMAGE_TOKEN
from skipvision.data.views import image_views
from skipvision.inference.checkpoint import load_model
from skipvision.model import positions_from_mask
from skipvision.skip.in_llm import method_steps

YES_NO = ("existence", "position")


def answer_spans(labels: torch.Tensor) -> list[list[int]]:
    """The positions of each answer in ``labels`` [T]: the runs of labels != -100, in order."""
    spans: list[list[int]] = []
    for p in (labels != -100).nonzero().flatten().tolist():
        if spans and p == spans[-1][-1] + 1:
            spans[-1].append(p)
        else:
            spans.append([p])
    return spans


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of an L2-regularised logistic regression on ``x`` [n, D] for ``y`` [n] (first 70% fit)."""
    fit = int(0.7 * len(y))
    x = (x - x[:fit].mean(0)) / (x[:fit].std(0) + 1e-5)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:fit] @ w + b, y[:fit]) + 1e-3 * w.square().sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[fit:] @ w + b > 0).float() == y[fit:]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder of a shapes recipe")
    parser.add_argument("--data", default="data/shapes", help="its data root")
    parser.add_argument("--shards", type=int, default=2, help="training shards to read")
    args = parser.parse_args()

    model, tokenizer, _ = load_model(args.checkpoint, "cpu", None, None)
    model.eval()
    num_layers = len(decoder_layers(model.backbone))
    if model.drop_stages(training=False) or model.visual.policy.routed_layers(num_layers):
        parser.error(
            "the probes read every position's hidden state in every layer: methods that drop or route tokens "
            "inside the LLM leave some layers without some positions"
        )
    transform = image_views(model.encoder, model.tiles)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    encoder = SampleEncoder(tokenizer, image_token, model.num_image_tokens, transform, max_length=4096)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    shards = sorted(str(p) for p in (Path(args.data) / "train").glob("*.tar"))[: args.shards]
    correct: dict[str, list[bool]] = defaultdict(list)
    states: dict[str, list[torch.Tensor]] = defaultdict(list)
    said_yes: dict[str, list[float]] = defaultdict(list)
    raw = list(wds.WebDataset(shards, shardshuffle=False))
    for start in range(0, len(raw), 50):
        chunk = raw[start : start + 50]
        batch = collate([encoder(s) for s in chunk], tokenizer.pad_token_id)
        with torch.no_grad():
            embedded = model.embed(batch["input_ids"], batch.get("pixel_values"), batch["num_images"])
            mask = batch["attention_mask"]
            positions = positions_from_mask(mask)
            with method_steps(model, embedded, mask, positions):  # the method's Skip-FFN plan and routing
                out = model.backbone(
                    inputs_embeds=embedded.embeds,
                    attention_mask=mask,
                    position_ids=positions,
                    output_hidden_states=True,
                )
        predicted = out.logits.argmax(-1)  # [B, T]
        for i, sample in enumerate(chunk):
            labels = batch["labels"][i]
            qtypes = json.loads(sample["json"])["qtypes"]
            for qtype, span in zip(qtypes, answer_spans(labels), strict=True):
                correct[qtype].append(all(predicted[i, p - 1] == labels[p] for p in span))
                decision = next((p for p in span if int(labels[p]) in (yes, no)), None)
                if qtype in YES_NO and decision is not None:
                    states[qtype].append(torch.stack([h[i, decision - 1] for h in out.hidden_states]))
                    said_yes[qtype].append(float(labels[decision] == yes))
    for qtype, hits in sorted(correct.items()):
        print(f"{qtype:<10} teacher-forced {sum(hits) / len(hits):6.1%} of {len(hits)} answers")
    for qtype in YES_NO:
        x, y = torch.stack(states[qtype]), torch.tensor(said_yes[qtype])
        layers = ", ".join(f"{probe_accuracy(x[:, layer], y):.1%}" for layer in range(x.shape[1]))
        print(f"{qtype:<10} probe per layer (embeddings first): {layers} ({len(y)} answers)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
