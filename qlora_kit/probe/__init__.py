"""Probe: what this machine and the model in question are, before anything is planned.

hardware.py reads the GPUs, RAM and CPU (and caps a GPU's memory for a run); sources.py finds a model, adapter or
data file wherever it is named (a folder, a catalogue alias, the Hugging Face hub), hub.py downloads from the hub
exactly what a model needs; catalog/ holds the catalogued GPUs and models. Imports: the package root's shared
modules (errors, units, files, text) and architectures/.
"""
