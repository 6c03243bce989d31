"""The five concepts of the lab, one module each, with the demo step notebook 01 calls.

* :mod:`.sparsification`: zeros in tensors that keep their shape (the engine
  lives in :mod:`lab_utils.engine.prune`; :mod:`.costs` counts zeros, bytes and seconds);
* :mod:`.structured`: pruning that removes whole MLP neurons, so tensors shrink;
* :mod:`.quantize`: fewer bits per weight (int8 per channel, torch dynamic int8,
  4-bit round-to-nearest in groups);
* :mod:`.distill`: a small student trained on a teacher's soft targets;
* :mod:`.moe`: MoEfication, an MLP split into experts of which a token runs a few.

The decoder demos share one :class:`.decoder.Decoder` (the model, its windows).
"""
