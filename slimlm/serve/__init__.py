"""Talk to a model: a terminal chat, an OpenAI-compatible server, speculative decoding with a draft model."""
