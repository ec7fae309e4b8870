"""Mask behaviour the broader property tests leave open: documents labelled in any order."""

from __future__ import annotations

import torch

from tinygpt import ModelConfig, TinyDecoderModel, masks


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


def test_documents_labelled_in_descending_order_each_get_the_logits_they_have_alone():
    """A packed row whose labels run downwards (3, 3, 1, 1, 1, 0, ...) still isolates every
    document: each one's logits equal those of the document run alone (fp64, 1e-10)."""
    torch.manual_seed(0)
    model = TinyDecoderModel(ModelConfig(vocab_size=13, d_model=16, n_heads=2, n_layers=2,
                                         d_ff=24, max_seq=16, norm_first=True,
                                         position="alibi")).double().eval()
    lengths, labels = (2, 3, 4), (3, 1, 0)
    documents = [torch.randint(13, (1, n)) for n in lengths]
    ids = torch.cat([torch.full((1, n), k) for k, n in zip(labels, lengths)], dim=1)
    logits = model(torch.cat(documents, dim=1), document_ids=ids)
    start = 0
    for document in documents:
        n = document.shape[1]
        torch.testing.assert_close(logits[:, start:start + n], model(document),
                                   rtol=1e-10, atol=1e-10)
        start += n
