pub mod bench;
pub mod convert;
pub mod delta;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod inspect;
pub mod merge;
