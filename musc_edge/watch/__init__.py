"""The watch daemon: file arrival rules, the crash-safe journal, result sinks."""
