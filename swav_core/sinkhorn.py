"""Placeholder until its module lands."""


def sinkhorn(*a, **k):
    raise NotImplementedError
