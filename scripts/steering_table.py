#!/usr/bin/env python3
"""Does steering toward a concept raise the probability of the concept's tokens? A table, measured on a real model.

For each concept prompt, the concept vector is the top left singular vector of its detached output map (what
``linlens concept`` returns), and the concept's tokens are the tokens it decodes to. For each neutral prompt and
each strength lambda (0 is the unsteered run), the script generates greedily with steering at the default layer
(floor(2L/3), every position), through the server's own request path (InProcessClient), then reads the
continuation's next-token distributions from one steered forward pass over prompt + continuation and reports:

- P(concept): the probability mass the model puts on the concept's tokens, averaged over the continuation's steps;
- hits: the share of generated tokens that are concept tokens.

Usage::

    python scripts/steering_table.py --model smollm2-135m --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from linlens.contract import ConceptVector, Steering, SteeringPositions, default_steering_layer
from linlens.engine.steering import steered
from linlens.server.inprocess import InProcessClient

CONCEPTS = ("The Golden Gate Bridge is in San", "Paris is the capital of", "The ocean is full of")
PROMPTS = ("Tell me about your day.", "The weather today is", "Here is a short story:")
STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def concept_mass(
    client: InProcessClient, concept: ConceptVector, prompt_ids: list[int], tokens: list[int], strength: float
) -> float:
    """Mean over the continuation's steps of the probability of the concept's tokens, under the steered model."""
    loaded = client.host.ready("")
    ids = torch.tensor([prompt_ids + tokens])
    concept_ids = torch.tensor([t.token_id for t in concept.tokens])
    layer = default_steering_layer(loaded.num_layers)
    with (
        torch.no_grad(),
        steered(
            loaded.model,
            concept.vector,
            layer=layer,
            strength=strength,
            positions=SteeringPositions.ALL,
            prompt_length=len(prompt_ids),
        ),
    ):
        logits = loaded.model(ids).logits[0].float()
    steps = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tokens)]
    return float(torch.softmax(steps, dim=-1)[:, concept_ids].sum(dim=-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8, help="concept tokens (decoded from the vector) counted")
    args = parser.parse_args()
    started = time.perf_counter()
    client = InProcessClient(args.model)
    loaded = client.host.ready("")
    layer = default_steering_layer(loaded.num_layers)
    print(
        f"Model `{args.model}` ({loaded.num_layers} layers, steering layer {layer}, every position), greedy, "
        f"{args.max_new_tokens} new tokens; {platform.machine()}, torch {torch.__version__}."
    )
    print()
    print("| concept prompt | concept tokens | prompt | " + " | ".join(f"λ={s:g}" for s in STRENGTHS) + " |")
    print("|---|---|---|" + "---|" * len(STRENGTHS))
    rises = total = 0
    samples: list[tuple[float, str]] = []
    for concept_prompt in CONCEPTS:
        concept = client.compute_concept(concept_prompt, tokens_per_vector=args.tokens)
        words = ", ".join(repr(t.text) for t in concept.tokens[:4])
        for prompt in PROMPTS:
            prompt_ids = [int(i) for i in loaded.tokenizer(prompt)["input_ids"]]
            cells, baseline = [], 0.0
            for strength in STRENGTHS:
                generation = client.generate(
                    token_ids=prompt_ids,
                    max_new_tokens=args.max_new_tokens,
                    ignore_eos=True,
                    steering=Steering(vector=concept.vector, strength=strength),
                )
                tokens = [t.token_id for t in generation.tokens]
                mass = concept_mass(client, concept, prompt_ids, tokens, strength)
                hits = sum(t in {c.token_id for c in concept.tokens} for t in tokens) / max(len(tokens), 1)
                if strength == 0.0:
                    baseline = mass
                else:
                    total += 1
                    rises += mass > baseline
                cells.append(f"{mass:.2g} ({hits:.0%})")
                if concept_prompt == CONCEPTS[0] and prompt == PROMPTS[0]:
                    samples.append((strength, generation.text))
            print(f"| {concept_prompt!r} | {words} | {prompt!r} | " + " | ".join(cells) + " |")
    print()
    print(f"Continuations of {PROMPTS[0]!r} steered toward {CONCEPTS[0]!r}:")
    print()
    for strength, text in samples:
        print(f"- λ={strength:g}: {text!r}")
    print()
    print(
        f"P(concept) above the unsteered run in {rises} of {total} steered cells; "
        f"{time.perf_counter() - started:.0f} s in all."
    )


if __name__ == "__main__":
    main()
