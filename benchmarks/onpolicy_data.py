"""``benchmarks.onpolicy`` on a transfer set twice the demo's: the first 1,600 train images of the
same world (the demo's 800 and 800 more, labelled by the same teachers), the same test split and
fresh world. What more teacher-labelled data buys, offline and on-policy, at one budget each.

    python -m benchmarks.onpolicy_data        # = python -m benchmarks.onpolicy --train-images 1600
"""

from __future__ import annotations

from benchmarks import onpolicy

TRAIN_IMAGES = 1600


def main(argv: list[str] | None = None) -> dict:
    return onpolicy.main([*(argv or []), "--train-images", str(TRAIN_IMAGES)])


if __name__ == "__main__":
    main()
