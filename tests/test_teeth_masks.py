"""Mask behaviour the broader property tests leave open: documents labelled in any order."""

from __future__ import annotations

import torch

from tinygpt import masks


def test_document_mask_blocks_other_documents_whatever_order_their_labels_come_in():
    """Labels are names, not a count: a row labelled 2, 2, 1, 0, 0 holds three documents, and a
    query sees only the earlier keys that carry its own label. The oracle is the definition
    written out pair by pair."""
    ids = torch.tensor([[2, 2, 1, 0, 0, 0], [0, 0, 0, 5, 5, 3]])
    t = ids.shape[1]
    pos = masks.positions(t)
    blocked = masks.document(pos, pos, ids)
    expected = torch.tensor([[[not (k <= q and row[q] == row[k]) for k in range(t)]
                              for q in range(t)] for row in ids.tolist()])
    assert torch.equal(blocked, expected)
