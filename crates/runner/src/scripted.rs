//! The scripted engine: a stand-in for a model that loads in steps, emits
//! deterministic tokens at a configured rate, and lets tests drive the
//! lifecycle through every phase. Faults are injected by the runner, not
//! here, so the engine stays a plain model of "work that takes time".

use std::time::Duration;

use ipc::proto::{InvalidTask, PromptReport, TaskRequest};
use ipc::Blob;
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError, StartError, Step};
use crate::fault::FaultSpec;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScriptedConfig {
    /// Delay before each token.
    pub token_delay_ms: u64,
    /// Load steps reported as `Loading { done, total }`.
    pub load_steps: u32,
    pub load_step_ms: u64,
    pub warmup_ms: u64,
    pub fault: Option<FaultSpec>,
}

impl Default for ScriptedConfig {
    fn default() -> Self {
        ScriptedConfig {
            token_delay_ms: 5,
            load_steps: 4,
            load_step_ms: 1,
            warmup_ms: 1,
            fault: None,
        }
    }
}

pub struct ScriptedEngine {
    config: ScriptedConfig,
    /// Only rank 0 samples and emits text; other ranks only take part.
    emits_tokens: bool,
}

pub struct ScriptedTask {
    words: Vec<String>,
    /// The prompt's words, when the task asked for its prompt's tokens.
    report: Option<Vec<String>>,
    produced: u32,
    max_tokens: u32,
}

impl ScriptedEngine {
    pub fn new(config: ScriptedConfig, rank: u32) -> Self {
        ScriptedEngine {
            config,
            emits_tokens: rank == 0,
        }
    }
}

/// The scripted reply: the prompt's words echoed in turn.
fn reply_words(prompt: &str) -> Vec<String> {
    let words: Vec<String> = prompt.split_whitespace().map(|w| format!("{w} ")).collect();
    if words.is_empty() {
        vec!["… ".to_string()]
    } else {
        words
    }
}

impl Engine for ScriptedEngine {
    type Task = ScriptedTask;

    fn connect(&mut self, _peers: &[String], _deadline: Duration) -> Result<(), EngineError> {
        Ok(())
    }

    fn load(&mut self, progress: &mut dyn FnMut(u32, u32)) -> Result<(), EngineError> {
        let total = self.config.load_steps.max(1);
        for done in 1..=total {
            std::thread::sleep(Duration::from_millis(self.config.load_step_ms));
            progress(done, total);
        }
        Ok(())
    }

    fn warm_up(&mut self) -> Result<(), EngineError> {
        std::thread::sleep(Duration::from_millis(self.config.warmup_ms));
        Ok(())
    }

    fn start(&mut self, request: &TaskRequest) -> Result<(ScriptedTask, u32), StartError> {
        let prompt = request.last_user_text();
        let words = reply_words(&prompt);
        let prompt_tokens = prompt.split_whitespace().count() as u32;
        let report = match request.report_prompt {
            None => None,
            // A word is a scripted engine's token.
            Some(PromptReport::Tokens) => {
                Some(prompt.split_whitespace().map(String::from).collect())
            }
            Some(PromptReport::Logprobs(_)) => {
                return Err(StartError::Invalid(
                    InvalidTask::InvalidPrompt,
                    "a scripted engine has no model to score a prompt with".into(),
                ))
            }
        };
        Ok((
            ScriptedTask {
                words,
                report,
                produced: 0,
                max_tokens: request
                    .max_tokens
                    .unwrap_or(supervisor::instance::DEFAULT_MAX_TOKENS),
            },
            prompt_tokens,
        ))
    }

    fn step(&mut self, task: &mut ScriptedTask) -> Result<Step, EngineError> {
        if let Some(words) = task.report.take() {
            return Ok(Step::Prompt {
                tokens: words.into_iter().map(|w| Blob(w.into_bytes())).collect(),
                logprobs: Vec::new(),
            });
        }
        if task.produced >= task.max_tokens {
            return Ok(Step::Finished {
                finish_reason: "length".into(),
                completion_tokens: task.produced,
            });
        }
        std::thread::sleep(Duration::from_millis(self.config.token_delay_ms));
        let word = task.words[task.produced as usize % task.words.len()].clone();
        task.produced += 1;
        Ok(if self.emits_tokens {
            Step::Token {
                text: word,
                logprobs: Vec::new(),
            }
        } else {
            Step::Progress
        })
    }
}
