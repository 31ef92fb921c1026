"""`lxm gallery`: a self-contained static HTML page of a finetuned model's predictions on a split, to see what it
gets wrong (no counterpart in airsplay/lxmert, which reports only the split's score).

Two halves, kept apart so the page can be written (and tested) without torch:

- `records`: run + split -> one typed `GalleryRecord` per example (text, images, ground truth, top-5 predictions,
  its score, right/wrong, type fields) and the `Summary` of the whole split, all through the task interface
  (`lxm.train.tasks`), so every task — VQA, GQA, NLVR2 and any task added later — is shown the same way;
- `page`: those records -> index.html (plain Python, html-escaped, filters in inline plain JavaScript), with
  `assets` drawing on each shown example's image(s) the boxes its [CLS] attended to most in the last cross layer
  into JPEG files beside it; `build` ties them together and writes the folder atomically.

This module imports nothing, so `lxm.gallery.page` imports without torch.
"""
