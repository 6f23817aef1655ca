"""Widgets of the chat UI."""
