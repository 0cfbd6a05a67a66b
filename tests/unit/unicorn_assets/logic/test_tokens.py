"""Token counts of captions against the encoder's reach: distribution and truncated share."""

import numpy as np

from unicorn_assets.logic.tokens import token_frame, token_summary, truncated_share_within


def test_summary_of_counts_around_the_limit():
    frame = token_frame(["a", "b", "c", "d"], np.array([10, 77, 78, 200]), limit=77)
    assert frame["truncated"].to_list() == [False, False, True, True]  # 77 fits, 78 is cut
    summary = token_summary(frame)
    assert summary["text_tokens_mean"] == (10 + 77 + 78 + 200) / 4
    assert summary["text_tokens_p50"] == 77.5 and summary["text_tokens_max"] == 200
    assert (summary["captions_truncated"], summary["truncated_share"]) == (2, 0.5)


def test_the_check_fails_above_the_share_and_names_the_fix():
    frame = token_frame(["a", "b", "c", "d"], np.array([10, 77, 78, 200]), limit=77)
    failed = truncated_share_within(frame, 0.25, 77)
    assert not failed.passed and "clip.long_text: chunk_mean" in failed.description
    assert failed.metadata["truncated_share"] == 0.5
    assert truncated_share_within(frame, 0.5, 77).passed
    assert truncated_share_within(token_frame([], np.array([]), 77), 0.0, 77).passed
