//! recompose-eval
