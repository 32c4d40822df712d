"""Repair methods and the patches some of them insert into a model."""
