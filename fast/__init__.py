"""The speed-ups. Each replaces one reference function of the method at one named seam, is switched by one
option, and is tested equal to the reference it replaces; the reference is what the method files show.

  static_decode.py            a static KV cache holding each prompt's keys and values once, a decode step of
                              fixed shapes, optionally compiled: sample.py's decode (`decoder=`), --decode
  shared_prompt.py            each prompt read once for its G completions, with gradients: the forward of
                              grpo.py's log-probs (`hidden=`; models.internals.completion_hidden repeats each
                              prompt G times) in the update and the KL reference pass, --shared_prompt
  listener_from_reference.py  the listener's answer slot read out of the KL reference pass when the listener
                              is the reference model: train.py's score_rollouts, --listener_from_reference
  answer_logits.py            p(b) read from the sampler's logits at the answer slot: evaluate.py's second
                              pass, --reuse_sampler_logits
"""
