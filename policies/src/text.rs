//! Size and shape caps on SQL text, checked on its tokens before anything parses or plans it.
//!
//! Parsing, planning and vetting recurse over the expression tree, and some of their steps are
//! quadratic in it: `SELECT 1+1+…` with a few thousand terms overflows a thread's stack, and
//! with a few hundred burns seconds of CPU. Counting operators and nesting on the token stream
//! is linear and recursion-free, so such a query is refused before any tree exists. The
//! coordinator and every node run this check, each with its own limits.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::refusal::{Refusal, Rule};

/// The caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextLimits {
    /// Longest SQL text, in characters.
    pub max_chars: usize,
    /// Deepest nesting of parentheses, brackets and CASE … END.
    pub max_nesting: usize,
    /// Most operators (arithmetic, comparison, concatenation, bitwise, casts, AND, OR, NOT,
    /// WHEN) in the whole query.
    pub max_operators: usize,
}

/// Refuses SQL text beyond `limits`: too long, nested too deep, or with too many operators.
pub fn check_text(sql: &str, limits: &TextLimits) -> Result<(), Refusal> {
    let chars = sql.chars().count();
    if chars > limits.max_chars {
        return Err(Refusal::new(
            Rule::QueryLength,
            format!(
                "the query is {chars} characters long; this server accepts at most {}",
                limits.max_chars
            ),
        ));
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|_| {
            Refusal::new(
                Rule::Invalid,
                "the SQL could not be read (an unterminated string or comment?)",
            )
        })?;
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut operators = 0usize;
    for token in &tokens {
        match token {
            Token::LParen | Token::LBracket | Token::LBrace => depth += 1,
            Token::RParen | Token::RBracket | Token::RBrace => depth = depth.saturating_sub(1),
            Token::Word(w) if w.quote_style.is_none() => match w.keyword {
                Keyword::CASE => depth += 1,
                Keyword::END => depth = depth.saturating_sub(1),
                Keyword::AND | Keyword::OR | Keyword::NOT | Keyword::WHEN => operators += 1,
                _ => {}
            },
            t if is_operator(t) => operators += 1,
            _ => {}
        }
        deepest = deepest.max(depth);
        // Stop at the first cap crossed: the rest need not be read.
        if deepest > limits.max_nesting {
            return Err(Refusal::new(
                Rule::QueryComplexity,
                format!(
                    "the query nests parentheses or CASE more than {} deep; simplify it",
                    limits.max_nesting
                ),
            ));
        }
        if operators > limits.max_operators {
            return Err(Refusal::new(
                Rule::QueryComplexity,
                format!(
                    "the query has more than {} operators (+, -, =, AND, OR, WHEN …); this \
                     server accepts at most that many",
                    limits.max_operators
                ),
            ));
        }
    }
    Ok(())
}

fn is_operator(token: &Token) -> bool {
    matches!(
        token,
        Token::Plus
            | Token::Minus
            | Token::Mul
            | Token::Div
            | Token::DuckIntDiv
            | Token::Mod
            | Token::StringConcat
            | Token::DoubleEq
            | Token::Eq
            | Token::Neq
            | Token::Lt
            | Token::Gt
            | Token::LtEq
            | Token::GtEq
            | Token::Spaceship
            | Token::DoubleColon
            | Token::Ampersand
            | Token::Pipe
            | Token::Caret
            | Token::ShiftLeft
            | Token::ShiftRight
            | Token::Tilde
            | Token::ExclamationMark
            | Token::Arrow
            | Token::LongArrow
            | Token::Sharp
    )
}
