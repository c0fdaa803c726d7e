"""Test helpers: tiny models, the PEFT oracle, Lightning modules, 2-process workers."""
