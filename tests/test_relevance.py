"""Relevance maps (`lxm.infer.relevance`, Chefer et al. ICCV 2021) on a model built by hand so that its answer reads
one box and one word and nothing else, while its attention looks elsewhere: relevance finds that box and that word,
raw attention does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lxm.infer.explain import explain_batch, shares, word_shares
from lxm.infer.relevance import answer_relevance, without_self
from lxm.model import LxmertTokenizer
from lxm.model.config import lxmert_tiny
from lxm.model.modeling import build_lxmert
from synthetic import BERT_VOCAB

H, N = 32, 6
WORD, DISTRACTOR_WORD = 7, 9  # token ids: the word the answer reads, the word [CLS] attends to
BOX, DISTRACTOR_BOX = 4, 1  # boxes: the one the answer reads, the one [CLS] attends to


def _unit(*pairs: tuple[int, float]) -> torch.Tensor:
    v = torch.zeros(H)
    for i, x in pairs:
        v[i] = x
    return v


def crafted_model():
    """A one-layer-per-stream LXMERT whose answer-1 logit is a function of box BOX's features and the word WORD only.

    Every sublayer's output projection is 0 (the residual LayerNorm then passes its input on) except two in the
    cross layer: its cross-attention and its language self-attention. In each, attention head 0 has a constant
    query and keys that single out a distractor (box DISTRACTOR_BOX by its features' dims 12-13, word
    DISTRACTOR_WORD by its embedding's dims 7-8) but values 0; head 1 attends uniformly and its value is
    a difference of two hidden dims (box: 14 - 15, word: 2 - 3) that is exactly 0 for every box and word but the
    chosen ones (LayerNorm keeps equal dims equal). So the distractors get the most attention and contribute
    nothing, and the answer reads BOX and WORD through head 1."""
    cfg = lxmert_tiny(l_layers=1, x_layers=1, r_layers=1, vocab_size=50, task_mask_lm=False, task_matched=False,
                      task_obj_predict=False, task_qa=True, num_qa_labels=2)
    model = build_lxmert(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
        emb = torch.randn(50, H, generator=g)
        for a, b in ((2, 3), (4, 5), (7, 8), (10, 11), (12, 13), (14, 15)):
            emb[:, b] = emb[:, a]  # no word carries a signal in these pairs of dims ...
        emb[WORD, 2], emb[WORD, 3] = 3.0, -3.0  # ... but WORD (read by the value) and
        emb[DISTRACTOR_WORD, 7], emb[DISTRACTOR_WORD, 8] = 3.0, -3.0  # the distractor (read by the key)
        model.lxmert.embeddings.word_embeddings.weight.copy_(emb)
        enc = model.lxmert.encoder
        enc.visn_fc.visn_fc.weight.copy_(torch.cat([torch.eye(16), torch.zeros(H - 16, 16)]))  # features -> dims 0-15
        x = enc.x_layers[0]
        for att, out, key, value, into in ((x.visual_attention.att, x.visual_attention.output, (12, 13), (14, 15),
                                            (4, 5)),
                                           (x.lang_self_att.self, x.lang_self_att.output, (7, 8), (2, 3), (10, 11))):
            att.query.bias.copy_(_unit((0, 4.0)))  # head 0 (dims 0-7): a constant query
            att.key.weight[0].copy_(_unit((key[0], 1.0), (key[1], -1.0)))  # its key: the distractor's dims
            att.value.weight[8].copy_(_unit((value[0], 1.0), (value[1], -1.0)))  # head 1 (dims 8-15): the value
            out.dense.weight[:, 8].copy_(_unit((into[0], 1.0), (into[1], -1.0)))
        model.lxmert.pooler.dense.weight[0].copy_(_unit((4, 1.0), (5, -1.0), (10, 1.0), (11, -1.0)))
        head = model.answer_head.logit_fc
        head[0].weight[0, 0] = 1.0
        head[0].bias.copy_(torch.linspace(-1, 1, 2 * H))
        head[0].bias[0] = 1.0
        head[3].weight[1, 0], head[3].bias[1] = 5.0, 10.0  # answer 1, increasing with both signals
    return model


def _inputs(ids=(1, DISTRACTOR_WORD, 20, WORD, 21, 2), features=None):
    ids = torch.tensor([list(ids) + [0, 0]])
    if features is None:
        g = torch.Generator().manual_seed(1)
        features = torch.randn(1, N, 16, generator=g)
        features[..., 13], features[..., 15] = features[..., 12], features[..., 14]
        features[0, DISTRACTOR_BOX, 12], features[0, DISTRACTOR_BOX, 13] = 3.0, -3.0
        features[0, BOX, 14], features[0, BOX, 15] = 2.0, -2.0
    return dict(input_ids=ids, attention_mask=(ids != 0).long(), visual_feats=features,
                visual_boxes=torch.rand(1, N, 4, generator=torch.Generator().manual_seed(2)))


def test_the_crafted_answer_reads_one_box_and_one_word_only():
    """The construction holds: changing any other box's features or any other word leaves the answer's logit
    exactly as it was; changing BOX or WORD moves it."""
    model = crafted_model()
    base = _inputs()

    def logit(inputs):
        with torch.no_grad():
            return float(model(**inputs).answer_logits[0, 1])

    reference = logit(base)
    g = torch.Generator().manual_seed(3)
    for n in range(N):
        feats = base["visual_feats"].clone()
        feats[0, n] = torch.randn(16, generator=g)
        if n != BOX:
            feats[0, n, 15] = feats[0, n, 14]
        if n != DISTRACTOR_BOX:
            feats[0, n, 13] = feats[0, n, 12]
        moved = logit({**base, "visual_feats": feats}) - reference
        assert (moved != 0) == (n == BOX), (n, moved)
    for t in range(1, 5):
        ids = base["input_ids"].clone()
        ids[0, t] = 30 + t
        moved = logit({**base, "input_ids": ids}) - reference
        assert (moved != 0) == (t == 3), (t, moved)  # position 3 holds WORD


def test_relevance_ranks_that_box_and_word_first_where_attention_does_not():
    model = crafted_model()
    inputs = _inputs()
    rel = answer_relevance(model, inputs, lambda out: out.answer_logits)
    assert rel.chosen.tolist() == [1]
    words, boxes = rel.words[0], rel.boxes[0]
    # every other box and word gets exactly 0: its value is 0, so the logit's gradient through its attention is 0
    assert int(boxes.argmax()) == BOX and boxes[BOX] > 0 and (boxes[torch.arange(N) != BOX] == 0).all()
    assert int(words.argmax()) == 3 and words[3] > 0 and (words[torch.arange(8) != 3] == 0).all()
    # raw attention: the [CLS] row of the last cross layer's attention and of its language self-attention, mean
    # over heads, both look at the distractors
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    raw_boxes = out.cross_attentions[-1][0, :, 0].mean(0)
    raw_words = out.attentions.cross_language_self[-1][0, :, 0].mean(0)
    assert int(raw_boxes.argmax()) == DISTRACTOR_BOX and raw_boxes[DISTRACTOR_BOX] > raw_boxes[BOX]
    assert int(raw_words.argmax()) == 1 and raw_words[1] > raw_words[3]  # position 1 holds DISTRACTOR_WORD
    # the default forward is untouched by explaining: the same logits, no attentions kept
    with torch.no_grad():
        plain = model(**inputs)
    torch.testing.assert_close(plain.answer_logits, rel.logits)
    assert plain.attentions is None and plain.cross_attentions is None
    assert all(p.grad is None for p in model.parameters())  # only the maps' gradients were taken
    # a frozen model (every parameter requires_grad False), asked under no_grad, gives the same
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        frozen = answer_relevance(model, inputs, lambda out: out.answer_logits)
    torch.testing.assert_close((frozen.words, frozen.boxes), (rel.words, rel.boxes))
    assert not any(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_explain_batch_gives_the_box_shares_by_either_method():
    class Task:  # what explain_batch reads of a finetuning task: its logits
        @staticmethod
        def logits(out):
            return out.answer_logits

    model, inputs = crafted_model(), _inputs()
    logits, boxes, words = explain_batch(Task, model, inputs, "relevance")
    assert boxes.shape == (1, N) and float(boxes[0, BOX]) == pytest.approx(1.0) and words.shape == (1, 8)
    logits_a, boxes_a, words_a = explain_batch(Task, model, inputs, "attention")
    assert words_a is None and int(boxes_a[0].argmax()) == DISTRACTOR_BOX
    torch.testing.assert_close(boxes_a.sum(-1), torch.ones(1))
    torch.testing.assert_close(logits, logits_a)
    with pytest.raises(ValueError, match="relevance, attention"):
        explain_batch(Task, model, inputs, "gradcam")
    assert shares(torch.zeros(1, 4)).tolist() == [[0.25] * 4]  # nothing relevant: equal shares


def test_without_self_normalises_the_off_diagonal_rows():
    """R̄ = (R - I) with rows summing to 1, + I (Chefer et al. eqs. 8-9); a row with nothing off the diagonal stays
    the identity's (the reference would divide by 0 there)."""
    r = torch.tensor([[[2.0, 1.0, 3.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]])
    expected = torch.tensor([[[1.2, 0.2, 0.6], [0.0, 1.0, 0.0], [0.5, 0.5, 1.0]]])
    torch.testing.assert_close(without_self(r), expected)


def test_word_shares_add_up_a_words_pieces():
    tok = LxmertTokenizer(BERT_VOCAB, max_length=8)
    text = "is the skateboarding dog happy today"  # "skateboarding" is several pieces; "today" is cut off
    pieces = [tok.tokenize(w) for w in text.split()]
    positions = np.zeros(8)
    start = 1 + len(pieces[0]) + len(pieces[1])
    positions[start:start + len(pieces[2])] = 1.0  # the pieces of "skateboarding"
    positions[1] = 2.0  # "is"
    got = word_shares(tok, text, positions)
    assert [w for w, _ in got] == text.split()
    n = len(pieces[2])
    assert got[0][1] == pytest.approx(2 / (2 + n)) and got[2][1] == pytest.approx(n / (2 + n))
    assert got[-1][1] == 0.0 and sum(s for _, s in got) == pytest.approx(1.0)


def test_a_model_without_cross_layers_gives_no_box_relevance():
    """x_layers = 0: the answer reads the language stream alone, so no box is relevant (and nothing fails)."""
    cfg = lxmert_tiny(x_layers=0, vocab_size=50, task_mask_lm=False, task_matched=False, task_obj_predict=False,
                      task_qa=True, num_qa_labels=2)
    torch.manual_seed(0)
    rel = answer_relevance(build_lxmert(cfg), _inputs(), lambda out: out.answer_logits)
    assert (rel.boxes == 0).all() and rel.words[0, 1:6].sum() > 0 and (rel.words[0, 6:] == 0).all()


@pytest.mark.parametrize("method", ["relevance", "attention"])
def test_images_of_fewer_boxes_than_the_batch_get_their_own_weights(method):
    """Given-box stores hold a varying count per image, so a batch pads: each image's weights come back cut to its
    own boxes, with padding given no share, and equal those of the image asked alone (no padding)."""
    from lxm.features import ImageFeatures
    from lxm.infer import Answerer
    from lxm.model import LxmertForFinetuning
    from lxm.train.tasks import VqaTask

    torch.manual_seed(0)
    task = VqaTask(["red", "blue", "green"])
    tokenizer = LxmertTokenizer(BERT_VOCAB, max_length=12)
    model = LxmertForFinetuning(task.model_config(lxmert_tiny(visual_feat_dim=8, vocab_size=tokenizer.vocab_size)))
    answerer = Answerer(task, model.eval(), tokenizer, "test", "random")
    rng = np.random.default_rng(0)

    def record(img_id, k):
        xy = rng.uniform(0, 50, (k, 2)).astype(np.float32)
        return ImageFeatures(img_id, 100, 100, np.zeros(k, np.int64), np.ones(k, np.float32), np.zeros(k, np.int64),
                             np.ones(k, np.float32), np.concatenate([xy, xy + 20], 1),
                             rng.normal(size=(k, 8)).astype(np.float32))

    recs = [record("a", 3), record("b", 5)]
    texts = ["what color is it?", "is the cup red?"]
    together = answerer.predict(texts, [[r] for r in recs], 3, explain=True, method=method)
    for text, rec, pred in zip(texts, recs, together):
        (alone,) = answerer.predict([text], [[rec]], 3, explain=True, method=method)
        (weights,) = pred.attention
        assert weights.shape == (rec.num_boxes,) and weights.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(weights, alone.attention[0], rtol=1e-4, atol=1e-6)
        assert [a for a, _ in pred.top] == [a for a, _ in alone.top]
