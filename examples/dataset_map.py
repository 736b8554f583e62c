"""GenerateOp as a `datasets` map function: new columns on every row, cached by `datasets`.

    python examples/dataset_map.py
"""

import tempfile
import time

import datasets

from pipeline_infer.operators import GenerateOp


def main() -> None:
    ds = datasets.Dataset.from_dict(
        {
            "city": ["Paris", "Tokyo", "Nairobi", "Lima"],
            "question": [
                "What river runs through Paris?",
                "What is Tokyo's most famous tower?",
                None,  # a bad row: the op writes an error for it instead of failing the map
                "Which mountains are near Lima?",
            ],
        }
    )

    # A template over columns; placeholders may only name columns.
    op = GenerateOp(
        template="About {city}: {question}",
        system_prompt="Answer in one short sentence.",
        sampling_params={"temperature": 0, "max_new_tokens": 32},
    )
    out = ds.map(op, batched=True, batch_size=64)
    for row in out:
        print(f"{row['city']:8} -> {row['generated_text']!r}  error={row['error']!r}")

    # The same op over Arrow batches (datasets' with_format("arrow")): same columns.
    arrow = ds.with_format("arrow").map(op, batched=True, batch_size=64)
    print(arrow.column_names)

    # datasets caches maps over file-backed datasets, keyed on the op's fingerprint (a hash of
    # its configuration): the same map again is read from the cache, a new temperature is not.
    with tempfile.TemporaryDirectory() as tmp:
        ds.save_to_disk(tmp)
        on_disk = datasets.load_from_disk(tmp)
        for label, the_op in [("first map", op), ("same op again", op),
                              ("temperature 0.7", GenerateOp(template="About {city}: {question}",
                                                             system_prompt="Answer in one short sentence.",
                                                             sampling_params={"temperature": 0.7, "max_new_tokens": 32}))]:
            start = time.perf_counter()
            mapped = on_disk.map(the_op, batched=True, batch_size=64)
            print(f"{label:16} {time.perf_counter() - start:6.2f}s  cache file {mapped.cache_files[0]['filename'].rsplit('/', 1)[-1]}")


if __name__ == "__main__":
    main()
