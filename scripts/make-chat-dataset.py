"""Write a small ShareGPT-style chat dataset, seeded, for scenarios/chat-dataset.yaml: no dataset can be downloaded
here, and a benchmark of "your own traffic" needs a file shaped like the public ones (a JSON list of rows with
`conversations`: turns `from` human or gpt, with their `value`). Replies vary in length as real ones do, so the
output lengths taken from the data (`output_from: data`) vary too.

    python scripts/make-chat-dataset.py [--out scenarios/data/chat-sharegpt.json] [--rows 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "scenarios" / "data" / "chat-sharegpt.json"

ASKS = ["Can you explain {topic} in simple terms?", "What are the main trade-offs of {topic}?",
        "Write a short checklist for {topic}.", "How would you introduce {topic} to a new team member?",
        "Give me three common mistakes people make with {topic}, and how to avoid them.",
        "Summarize the history of {topic} in a paragraph.", "Compare {topic} with {other}."]
TOPICS = ["database indexing", "unit testing", "container orchestration", "public key cryptography",
          "gradient descent", "HTTP caching", "code review", "load balancing", "garbage collection",
          "prefix caching in LLM serving", "budgeting for a small business", "sourdough baking", "marathon training"]
SENTENCES = ["The key idea is to trade a little extra work up front for much less work later.",
             "In practice, the right choice depends on how often the data changes and how it is read.",
             "A good first step is to measure the current behaviour before changing anything.",
             "Most problems come from unclear ownership rather than from the technology itself.",
             "Start small, check the results, and only then extend the approach to the rest of the system.",
             "It helps to write down the assumptions, because they are what usually turns out to be wrong.",
             "The cost grows with the size of the input, so large cases deserve a separate test.",
             "Keep the common path simple and handle the rare cases explicitly."]


def conversation(rng: np.random.Generator, i: int) -> dict:
    turns = []
    for _ in range(int(rng.integers(1, 4))):
        topic, other = rng.choice(TOPICS, size=2, replace=False)
        turns.append({"from": "human", "value": str(rng.choice(ASKS)).format(topic=topic, other=other)})
        # Reply lengths spread like real chats: mostly short, a long tail.
        n = int(np.clip(rng.lognormal(1.5, 0.7), 1, 30))
        turns.append({"from": "gpt", "value": " ".join(rng.choice(SENTENCES, size=n))})
    return {"id": f"chat-{i:05d}", "conversations": turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([conversation(rng, i) for i in range(args.rows)], indent=1))
    print(f"wrote {args.rows} conversations to {args.out}")


if __name__ == "__main__":
    main()
