"""The ground floor: what every other part of the project stands on, importing none of it.

Errors, architectures as data and the catalogue of official checkpoints (`catalogue.json`), the Keras
network, its serving path, preprocessing and class names, a converted folder's record and parity
report types, the runtime settings (TensorFlow, oneDNN), progress steps and terminal text.
"""
