"""Thin glue between the TempBalance engine and training frameworks."""
