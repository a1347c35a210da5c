pub mod bench;
pub mod convert;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod inspect;
