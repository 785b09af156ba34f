"""Receptive fields: support maps through a traced CNN graph (`SupportGraph`) and their geometry."""
from pipeline.rf.graph import GraphError, SupportGraph, trace
from pipeline.rf.support import END, Field, Support

__all__ = ["END", "Field", "GraphError", "Support", "SupportGraph", "trace"]
