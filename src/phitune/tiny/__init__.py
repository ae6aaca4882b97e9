"""The small models the demo and the tests build: a tiny Phi-3 (phi3) and a tiny Phi-4-multimodal (vision). They sit
above data, whose chat templates they use."""
