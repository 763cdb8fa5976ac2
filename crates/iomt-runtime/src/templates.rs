//! The mapping templates a running pipeline uses, and their hot reload.
//!
//! On AKS the templates are a mounted ConfigMap, which the kubelet updates in place (an atomic
//! swap of the `..data` symlink). Rather than needing a rollout for a template change, the
//! running process reads the files again every `templates.reload_interval`, compiles a version
//! whose content changed, and swaps it in whole: the device and FHIR mappings change together,
//! so no batch is normalized with one version and grouped with another's periods by accident.
//! A version that does not compile is logged once and counted, and the one in use stays.
//!
//! Polling the content, not watching inotify events, is deliberate: a symlink swap, an editor's
//! rename-over and a network volume all show up as new content, while their file events
//! differ. Two small files read every few seconds cost nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use iomt_normalize::Normalizer;
use iomt_templates::TemplateError;
use iomt_templates::device::DeviceMapping;
use iomt_templates::fhir::FhirMapping;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::Metrics;

/// One compiled version of the two mappings.
#[derive(Debug)]
pub struct Templates {
    /// The device mapping, ready to normalize.
    pub normalizer: Normalizer,
    /// The FHIR mapping.
    pub mapping: FhirMapping,
    /// Identifies the files' content: the first 12 hex digits of a SHA-256 over both, so
    /// that every pod running the same ConfigMap reports the same version.
    pub version: String,
    /// Device templates whose `typeName` no FHIR template takes, each with its line and the
    /// closest FHIR type name. Accepted, as MedTech accepts them (their measurements are
    /// dead-lettered), but said at start and at each reload.
    pub unmapped_types: Vec<TemplateError>,
}

impl Templates {
    /// A version from compiled mappings and the text they were compiled from.
    pub fn new(device: DeviceMapping, fhir: FhirMapping, version: String) -> Self {
        Self {
            unmapped_types: fhir.unmapped_types(&device),
            normalizer: Normalizer::new(device),
            mapping: fhir,
            version,
        }
    }

    /// Reads and compiles the two files.
    pub fn load(device: &Path, fhir: &Path) -> Result<Self, TemplateFileError> {
        let device_text = read_template_file(device)?;
        let fhir_text = read_template_file(fhir)?;
        Self::compile((device, &device_text), (fhir, &fhir_text))
    }

    /// Compiles two template texts, naming the file whose templates are wrong.
    fn compile(device: (&Path, &str), fhir: (&Path, &str)) -> Result<Self, TemplateFileError> {
        let device_mapping =
            DeviceMapping::parse(device.1).map_err(|e| compile_error(device.0, &e))?;
        let fhir_mapping = FhirMapping::parse(fhir.1).map_err(|e| compile_error(fhir.0, &e))?;
        Ok(Self::new(
            device_mapping,
            fhir_mapping,
            Self::version_of(device.1, fhir.1),
        ))
    }

    /// The version of a pair of template texts.
    pub fn version_of(device_text: &str, fhir_text: &str) -> String {
        let mut hash = Sha256::new();
        hash.update(device_text.as_bytes());
        // A separator, so that moving text from one file to the other is a new version.
        hash.update([0]);
        hash.update(fhir_text.as_bytes());
        hash.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Reads a template file, refusing one above `limits.template_file_bytes` before reading it.
pub fn read_template_file(path: &Path) -> Result<String, TemplateFileError> {
    let fail = |message: String| TemplateFileError {
        file: path.to_owned(),
        message,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| fail(format!("cannot read: {e}")))?
        .len();
    let most = iomt_core::limits().template_file_bytes as u64;
    if size > most {
        return Err(fail(format!(
            "is {size} bytes; the limit is {most} (limits.template_file_bytes)"
        )));
    }
    std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))
}

/// Why a template file cannot be used: unreadable, too large, or (on a reload) invalid.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct TemplateFileError {
    /// The template file at fault.
    pub file: PathBuf,
    /// What is wrong: the first template errors, with their lines, paths and expressions.
    pub message: String,
}

fn compile_error(file: &Path, errors: &[TemplateError]) -> TemplateFileError {
    const SHOWN: usize = 3;
    let mut message = errors
        .iter()
        .take(SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > SHOWN {
        message.push_str(&format!(" (and {} more)", errors.len() - SHOWN));
    }
    TemplateFileError {
        file: file.to_owned(),
        message,
    }
}

/// The version in use, shared by the pipeline's stages and swapped whole on a reload.
#[derive(Debug, Clone)]
pub struct LiveTemplates(Arc<ArcSwap<Templates>>);

impl LiveTemplates {
    /// Starts with `templates`.
    pub fn new(templates: Templates) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(templates)))
    }

    /// The version in use now. A stage holds it for one unit of work (a batch, a group
    /// write), so each unit sees one version from start to end.
    pub fn current(&self) -> Arc<Templates> {
        self.0.load_full()
    }

    /// Reads the version in use for a moment, without the reference count `current` costs:
    /// for lookups on the per-measurement path.
    pub fn with<R>(&self, read: impl FnOnce(&Templates) -> R) -> R {
        read(&self.0.load())
    }

    fn swap(&self, templates: Templates) {
        self.0.store(Arc::new(templates));
    }
}

/// The files a configuration names, and how often they are read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateFiles {
    /// The device mapping file.
    pub device: PathBuf,
    /// The FHIR mapping file.
    pub fhir: PathBuf,
    /// How often the files are read again; zero: never.
    pub reload_interval: Duration,
}

/// What one look at the files found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// Their content is the version in use, or the last one rejected.
    Unchanged,
    /// A new version is in use.
    Applied {
        /// The version replaced.
        from: String,
        /// The version now in use.
        to: String,
    },
    /// A new version does not compile; the old one stays.
    Rejected {
        /// The rejected content's version.
        version: String,
    },
}

/// Reloads the templates from their files when their content changes.
#[derive(Debug)]
pub struct Reloader {
    live: LiveTemplates,
    files: TemplateFiles,
    metrics: Arc<Metrics>,
    /// The version last rejected, so that a broken file is reported once, not at every look.
    rejected: Option<String>,
}

impl Reloader {
    /// A reloader of `live` from `files`; reports the version in use to `metrics`.
    pub fn new(live: LiveTemplates, files: TemplateFiles, metrics: Arc<Metrics>) -> Self {
        Self {
            live,
            files,
            metrics,
            rejected: None,
        }
    }

    /// Reads the files once and swaps in their content when it is a new version that
    /// compiles. A file that cannot be read (mid-update, say) is a rejected version too.
    pub fn check(&mut self) -> Reload {
        let texts = read_template_file(&self.files.device)
            .and_then(|d| Ok((d, read_template_file(&self.files.fhir)?)));
        let (device_text, fhir_text) = match texts {
            Ok(texts) => texts,
            Err(e) => return self.reject(String::new(), &e),
        };
        let version = Templates::version_of(&device_text, &fhir_text);
        let current = self.live.current();
        if version == current.version || self.rejected.as_deref() == Some(version.as_str()) {
            return Reload::Unchanged;
        }
        let compiled = Templates::compile(
            (&self.files.device, &device_text),
            (&self.files.fhir, &fhir_text),
        );
        let templates = match compiled {
            Ok(templates) => templates,
            Err(e) => return self.reject(version, &e),
        };
        self.rejected = None;
        for error in &templates.unmapped_types {
            tracing::warn!(file = %self.files.device.display(), %error, "a device template's measurements will be dead-lettered");
        }
        self.live.swap(templates);
        self.metrics
            .template_version(Some(&current.version), &version);
        self.metrics.template_reload("applied");
        tracing::info!(from = %current.version, to = %version, "templates reloaded");
        Reload::Applied {
            from: current.version.clone(),
            to: version,
        }
    }

    fn reject(&mut self, version: String, error: &TemplateFileError) -> Reload {
        if self.rejected.as_deref() == Some(version.as_str()) {
            return Reload::Unchanged;
        }
        self.rejected = Some(version.clone());
        self.metrics.template_reload("rejected");
        tracing::warn!(
            %error,
            version = %version,
            in_use = %self.live.current().version,
            "new templates rejected; the version in use stays"
        );
        Reload::Rejected { version }
    }

    /// Looks at the files every `reload_interval` until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        if self.files.reload_interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.files.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            // Compiling a large template set takes milliseconds of CPU: off the async workers.
            let (back, reload) = match tokio::task::spawn_blocking(move || {
                let reload = self.check();
                (self, reload)
            })
            .await
            {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(error = %e, "the template reload failed; reloads stop");
                    return;
                }
            };
            self = back;
            tracing::debug!(?reload, "templates checked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICE: &str = r#"{"templateType":"CollectionContent","template":[{"templateType":"JsonPathContent","template":{"typeName":"hr","typeMatchExpression":"$..[?(@heartRate)]","deviceIdExpression":"$.deviceId","timestampExpression":"$.time","values":[{"required":true,"valueExpression":"$.heartRate","valueName":"hr"}]}}]}"#;
    const FHIR: &str = r#"{"templateType":"CollectionFhir","template":[{"templateType":"CodeValueFhir","template":{"typeName":"hr","value":{"valueName":"hr","valueType":"Quantity"},"codes":[{"code":"8867-4","system":"http://loinc.org"}]}}]}"#;

    fn setup(dir: &Path) -> (Reloader, LiveTemplates, Arc<Metrics>) {
        std::fs::write(dir.join("d.json"), DEVICE).unwrap();
        std::fs::write(dir.join("f.json"), FHIR).unwrap();
        let live =
            LiveTemplates::new(Templates::load(&dir.join("d.json"), &dir.join("f.json")).unwrap());
        let metrics = Arc::new(Metrics::new());
        metrics.template_version(None, &live.current().version);
        let files = TemplateFiles {
            device: dir.join("d.json"),
            fhir: dir.join("f.json"),
            reload_interval: Duration::from_secs(1),
        };
        (
            Reloader::new(live.clone(), files, metrics.clone()),
            live,
            metrics,
        )
    }

    #[test]
    fn a_new_version_is_swapped_in_and_a_broken_one_rejected_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reloader, live, metrics) = setup(dir.path());
        let first = live.current().version.clone();
        assert_eq!(reloader.check(), Reload::Unchanged);

        let fhir = FHIR.replace("8867-4", "8889-8");
        std::fs::write(dir.path().join("f.json"), &fhir).unwrap();
        let second = Templates::version_of(DEVICE, &fhir);
        assert_eq!(
            reloader.check(),
            Reload::Applied {
                from: first.clone(),
                to: second.clone()
            }
        );
        assert_eq!(live.current().version, second);
        assert!(live.current().mapping.lookup("hr").is_some());

        // A template error: rejected and counted once, the version in use stays.
        let broken = DEVICE.replace("$.heartRate", "$.[");
        std::fs::write(dir.path().join("d.json"), &broken).unwrap();
        assert!(matches!(reloader.check(), Reload::Rejected { .. }));
        assert_eq!(reloader.check(), Reload::Unchanged);
        assert_eq!(live.current().version, second);
        let text = metrics.encode();
        assert!(
            text.contains(&format!("TemplateVersion{{hash=\"{second}\"}} 1")),
            "{text}"
        );
        assert!(!text.contains(&first), "{text}");
        assert!(
            text.contains("TemplateReload_total{outcome=\"rejected\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("TemplateReload_total{outcome=\"applied\"} 1"),
            "{text}"
        );

        // Going back to the first version is a reload like any other.
        std::fs::write(dir.path().join("d.json"), DEVICE).unwrap();
        std::fs::write(dir.path().join("f.json"), FHIR).unwrap();
        assert!(matches!(reloader.check(), Reload::Applied { .. }));
        assert_eq!(live.current().version, first);
    }

    #[test]
    fn a_missing_file_is_rejected_and_the_error_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reloader, live, _) = setup(dir.path());
        let before = live.current().version.clone();
        std::fs::remove_file(dir.path().join("f.json")).unwrap();
        assert!(matches!(reloader.check(), Reload::Rejected { .. }));
        assert_eq!(live.current().version, before);
        let e = read_template_file(&dir.path().join("f.json")).unwrap_err();
        assert!(e.to_string().contains("f.json: cannot read"), "{e}");
    }

    #[test]
    fn a_compile_error_names_the_file_and_line() {
        let errors = DeviceMapping::parse("{\n\"templateType\": 1}").unwrap_err();
        let e = compile_error(Path::new("/t/devicecontent.json"), &errors);
        assert!(e.to_string().starts_with("/t/devicecontent.json: "), "{e}");
    }
}
