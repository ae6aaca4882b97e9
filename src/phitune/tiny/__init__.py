"""The small models the demo, the examples and the tests build: a tiny Phi-3 (phi3), the Phi family's other shapes
with their real templates (families: the shipped tiny Phi-4-mini and Phi-4) and a tiny Phi-4-multimodal (vision).
They sit above data, whose chat templates they use."""
