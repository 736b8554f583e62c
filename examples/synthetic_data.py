"""Synthetic data: one shared system prompt, many topics x seeds, sampled reproducibly.

Every row gets its own sampling seed derived from the run seed and the row's key, so rerunning
(or resuming a file job) reproduces the same samples, while the rows differ from each other.
The shared system prompt is the same prefix on every request, which the prefix cache reuses.

    python examples/synthetic_data.py
"""

import itertools

import datasets

from pipeline_infer.operators import GenerateOp

SYSTEM = (
    "You write short, varied training examples for a customer-support assistant. "
    "Each answer is a single realistic customer message, no preamble."
)
TOPICS = ["a late delivery", "a double charge", "a broken zipper", "changing an address"]
STYLES = ["polite", "angry", "confused"]


def main() -> None:
    rows = [
        {"key": f"{t}|{s}|{i}", "topic": t, "style": s}
        for (t, s), i in itertools.product(itertools.product(TOPICS, STYLES), range(2))
    ]
    ds = datasets.Dataset.from_list(rows)
    op = GenerateOp(
        template="Write a {style} customer message about {topic}.",
        system_prompt=SYSTEM,
        key_column="key",  # the row's seed follows this key, not its position
        seed=1234,  # the run seed
        sampling_params={"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 40},
        output_column="message",
    )
    out = ds.map(op, batched=True, batch_size=256)
    for row in out.select(range(6)):
        print(f"[{row['style']:8} | {row['topic']:20}] {row['message']!r}")
    print(f"... {len(out)} rows, {sum(out['completion_tokens'])} generated tokens")


if __name__ == "__main__":
    main()
