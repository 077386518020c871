"""Write the small RL data sets: preference pairs (data/preference/) and prompts (data/rl_prompts/).

Arithmetic in the SFT data's style ("What is 17 + 72?" -> "17 + 72 = 89. So the answer is 89.").
A preference pair has the correct answer as chosen and an incorrect one as rejected, of three
kinds in turn: the wrong sum in the same format, a final answer that contradicts the worked line,
and a wrong answer without the worked line. Train files mix both preference formats
({input_text, candidate_0, candidate_1, choice} and {prompt, chosen, rejected}).
Prompts carry the gold ``answer`` for the exact-match reward.

    python scripts/build_rl_data.py            # deterministic (seed 0)
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def problem(rng: random.Random) -> tuple[str, int, int, int, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    result = a + b if op == "+" else a - b
    return f"What is {a} {op} {b}?", a, b, result, op


def worked(a: int, op: str, b: int, shown: int, final: int) -> str:
    return f"{a} {op} {b} = {shown}. So the answer is {final}."


def wrong(rng: random.Random, result: int) -> int:
    return result + rng.choice([-1, 1]) * rng.randint(1, 9)


def preference_row(rng: random.Random, i: int, style: str) -> dict:
    question, a, b, result, op = problem(rng)
    chosen = worked(a, op, b, result, result)
    bad = wrong(rng, result)
    kind = i % 3
    if kind == 0:
        rejected = worked(a, op, b, bad, bad)  # wrong arithmetic, same format
    elif kind == 1:
        rejected = worked(a, op, b, result, bad)  # final answer contradicts the worked line
    else:
        rejected = f"The answer is {bad}."  # wrong, no working
    if style == "pair":
        return {"prompt": question, "chosen": chosen, "rejected": rejected}
    choice = rng.randint(0, 1)
    candidates = [rejected, chosen] if choice == 1 else [chosen, rejected]
    return {"input_text": question, "candidate_0": candidates[0], "candidate_1": candidates[1], "choice": choice}


def main() -> None:
    from rayapp.data.readers import write_jsonl_atomic

    rng = random.Random(0)
    train = [preference_row(rng, i, "pair" if i % 2 else "candidates") for i in range(384)]
    val = [preference_row(rng, i, "candidates") for i in range(96)]
    write_jsonl_atomic(ROOT / "data/preference/train.jsonl", train)
    write_jsonl_atomic(ROOT / "data/preference/val.jsonl", val)

    prompts = []
    for _ in range(288):
        question, _, _, result, _ = problem(rng)
        prompts.append({"input_text": question, "answer": str(result)})
    write_jsonl_atomic(ROOT / "data/rl_prompts/train.jsonl", prompts[:256])
    write_jsonl_atomic(ROOT / "data/rl_prompts/val.jsonl", prompts[256:])
    print(f"wrote {len(train)}+{len(val)} preference pairs and {len(prompts)} prompts")


if __name__ == "__main__":
    main()
