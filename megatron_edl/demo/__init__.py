"""The CPU quickstart demo (``make demo``, docs/quickstart.md): not part of the product.

* :mod:`megatron_edl.demo.corpus`: the offline multi-domain corpus builder, with its roff
  converter (:mod:`megatron_edl.demo.roff`) and sympy math generator
  (:mod:`megatron_edl.demo.mathgen`).
* :mod:`megatron_edl.demo.tokenizer`: a small byte-level BPE tokenizer trainer.
* :mod:`megatron_edl.demo.quickstart`: corpus -> tokenizer -> labelled data -> baseline and EDL
  runs -> report; its model and training settings are ``quickstart_model.yaml``.
* :mod:`megatron_edl.demo.study`: arms x seeds on the quickstart's data.

The product (``megatron_edl`` outside this package) never imports it.
"""
