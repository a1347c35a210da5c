//! recompose-llm
