//! `iomt mapping test` and `iomt mapping validate`: the offline mapping debugger.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use iomt_convert::{ConvertError, ResourceIds, convert_window, observation_groups};
use iomt_core::{DeviceEvent, Measurement, MeasurementGroup, Timestamp};
use iomt_normalize::{
    NormalizeError, Normalizer, Output, Trace, envelope, envelope_enqueued_time, explain,
    parse_body,
};
use iomt_runtime::templates::{Templates, read_template_file};
use iomt_templates::TemplateError;
use iomt_templates::device::{ContentTemplate, DeviceMapping};
use iomt_templates::expr::Expression;
use iomt_templates::fhir::FhirMapping;
use serde::Serialize;
use serde_json::Value;

use crate::style::{Palette, paint};
use crate::{ColorChoice, OutputFormat};

/// Exit code: the data did not fit the templates.
const EXIT_DATA_ERRORS: u8 = 1;
/// Exit code: a template or the command line is invalid.
const EXIT_INVALID_TEMPLATE: u8 = 2;

#[derive(Debug, Subcommand)]
pub(crate) enum MappingCommand {
    /// Run a device mapping over one message and show the normalized measurements.
    ///
    /// Exit code 0 when the message produced no errors, 1 when its data did not fit the
    /// templates, 2 when the mapping is invalid (every template error is listed).
    Test(TestArgs),
    /// Check a device mapping (and a FHIR mapping) and list every error with its line and JSON
    /// path.
    Validate(ValidateArgs),
    /// Write the device and FHIR mappings of a MedTech service exported from Azure (an ARM or
    /// Bicep-compiled resource, an ARM template, or `az healthcareapis workspace iot-connector
    /// show` / `fhir-destination show` output) as the two template files, and check them.
    ///
    /// Exit code 0 when both were written and are valid, 2 otherwise.
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// Exported JSON files (a connector and its FHIR destination may come in two); `-` reads
    /// standard input.
    #[arg(required = true, value_name = "FILE")]
    exports: Vec<PathBuf>,
    /// Where to write devicecontent.json and fhirmapping.json.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// With several connectors in the exports: the one whose resource name contains this.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
    /// Colour in text output.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
}

#[derive(Debug, Args)]
pub(crate) struct TestArgs {
    /// The device mapping (a CollectionContent document).
    #[arg(long, value_name = "FILE")]
    device_mapping: PathBuf,
    /// The FHIR mapping (a CollectionFhir document); when given, the measurements are also
    /// grouped and converted to Observations.
    #[arg(long, value_name = "FILE")]
    fhir_mapping: Option<PathBuf>,
    #[command(flatten)]
    input: InputArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Colour in text output.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct InputArgs {
    /// A message body; it is wrapped as {"Body": …, "Properties": {}, "SystemProperties": {}},
    /// as the service wraps every event. `-` reads standard input. A JSON Lines file (one
    /// message per line) or a folder (`*.json` files, one message each, and `*.jsonl` files)
    /// is a batch: a line per message and totals.
    #[arg(long, value_name = "FILE")]
    message: Option<PathBuf>,
    /// A complete document to evaluate as is, normally an Event Hub envelope
    /// {"Body", "Properties", "SystemProperties"}; a captured line with "BodyText" (a body that
    /// is not JSON) is read as `iomt replay` reads it. `-` reads standard input. A JSON Lines
    /// file (a capture) or a folder is a batch, as for --message.
    #[arg(long, value_name = "FILE")]
    event: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    /// The device mapping (a CollectionContent document).
    device_mapping: PathBuf,
    /// The FHIR mapping (a CollectionFhir document).
    fhir_mapping: Option<PathBuf>,
    /// Accept device templates whose typeName no FHIR template takes (a warning then, not an
    /// error): their measurements are dead-lettered at run time, as MedTech does.
    #[arg(long)]
    allow_unmapped_types: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Colour in text output.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
}

pub(crate) fn run(cmd: MappingCommand) -> anyhow::Result<u8> {
    // The debugger holds templates and messages to the limits a run would: those of
    // `IOMT_CONFIG` and `IOMT__LIMITS__*`, when they read (a configuration with other
    // problems is not this command's concern).
    let config = std::env::var_os("IOMT_CONFIG").map(std::path::PathBuf::from);
    if let Ok(c) = iomt_runtime::Config::load(config.as_deref(), std::env::vars()) {
        iomt_core::set_limits(c.limits);
    }
    match cmd {
        MappingCommand::Test(args) => test(&args),
        MappingCommand::Validate(args) => validate(&args),
        MappingCommand::Import(args) => import(&args),
    }
}

/// An error as printed in JSON output: template errors and data errors share one list.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ReportedError {
    Template {
        file: String,
        #[serde(flatten)]
        error: TemplateError,
    },
    Data(NormalizeError),
    Convert {
        kind: &'static str,
        message: String,
        #[serde(rename = "type")]
        type_name: String,
    },
    Input {
        message: String,
    },
}

#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    measurements: &'a [Measurement],
    observations: Vec<Value>,
    errors: Vec<ReportedError>,
}

fn print_json(measurements: &[Measurement], errors: Vec<ReportedError>) -> anyhow::Result<()> {
    print_report(measurements, Vec::new(), errors)
}

fn print_report(
    measurements: &[Measurement],
    observations: Vec<Value>,
    errors: Vec<ReportedError>,
) -> anyhow::Result<()> {
    let report = JsonReport {
        measurements,
        observations,
        errors,
    };
    crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn read_input(path: &Path) -> std::io::Result<Vec<u8>> {
    read_at_most(path, iomt_core::limits().message_bytes as u64)
}

/// A file (`-`: standard input), read up to one byte past `limit`: a longer one is refused by
/// its caller's size check, which needs no more.
fn read_at_most(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    if path == Path::new("-") {
        std::io::stdin().take(limit + 1).read_to_end(&mut buf)?;
    } else {
        std::fs::File::open(path)?
            .take(limit + 1)
            .read_to_end(&mut buf)?;
    }
    Ok(buf)
}

/// Both mappings of a run, validated.
pub(crate) struct Mappings {
    pub(crate) device: DeviceMapping,
    pub(crate) fhir: Option<FhirMapping>,
    /// The version of the two texts, as a running pipeline reports it.
    pub(crate) version: String,
}

/// Reads and validates the device mapping and the optional FHIR mapping, collecting the
/// errors of both files. An unreadable file is an `Err`; invalid templates are `Ok(Err(_))`.
fn load_mappings(
    device: &Path,
    fhir: Option<&Path>,
) -> anyhow::Result<Result<Mappings, Vec<ReportedError>>> {
    // A mapping is a few kilobytes; a file far larger is a mistake, and reading and
    // validating it would take memory in proportion.
    let read = |path: &Path| read_template_file(path).map_err(anyhow::Error::from);
    let device_text = read(device)?;
    let fhir_text = fhir.map(read).transpose()?;
    let mut errors = Vec::new();
    let mut collect = |path: &Path, found: Vec<TemplateError>| {
        let file = path.display().to_string();
        errors.extend(found.into_iter().map(|error| ReportedError::Template {
            file: file.clone(),
            error,
        }));
    };
    let device_mapping = DeviceMapping::parse(&device_text)
        .map_err(|e| collect(device, e))
        .ok();
    let fhir_mapping = match (fhir, &fhir_text) {
        (Some(path), Some(text)) => FhirMapping::parse(text).map_err(|e| collect(path, e)).ok(),
        _ => None,
    };
    Ok(match device_mapping {
        Some(device) if errors.is_empty() => Ok(Mappings {
            device,
            fhir: fhir_mapping,
            version: Templates::version_of(&device_text, fhir_text.as_deref().unwrap_or("")),
        }),
        _ => Err(errors),
    })
}

/// Loads both mappings, or reports why they cannot be used and gives the exit code.
pub(crate) fn load_or_report(
    format: OutputFormat,
    palette: &Palette,
    device: &Path,
    fhir: Option<&Path>,
) -> anyhow::Result<Result<Mappings, u8>> {
    Ok(match load_mappings(device, fhir) {
        Err(e) => Err(unreadable(format, &e)?),
        Ok(Err(errors)) => Err(invalid_mapping(format, palette, errors)?),
        Ok(Ok(m)) => Ok(m),
    })
}

fn validate(args: &ValidateArgs) -> anyhow::Result<u8> {
    let palette = Palette::new(args.color);
    let mappings = match load_or_report(
        args.output,
        &palette,
        &args.device_mapping,
        args.fhir_mapping.as_deref(),
    )? {
        Ok(m) => m,
        Err(code) => return Ok(code),
    };
    let unmapped = mappings
        .fhir
        .as_ref()
        .map(|fhir| fhir.unmapped_types(&mappings.device))
        .unwrap_or_default();
    if !unmapped.is_empty() && !args.allow_unmapped_types {
        let file = args.device_mapping.display().to_string();
        let errors = unmapped
            .into_iter()
            .map(|error| ReportedError::Template {
                file: file.clone(),
                error,
            })
            .collect();
        return invalid_mapping(args.output, &palette, errors);
    }
    match args.output {
        OutputFormat::Json => print_json(&[], Vec::new())?,
        OutputFormat::Text => {
            crate::outln!(
                "{} {}: {} template(s)",
                paint(palette.ok, "valid"),
                args.device_mapping.display(),
                mappings.device.templates.len()
            );
            for t in &mappings.device.templates {
                crate::outln!("  {} (line {})", t.label(), t.line);
            }
            if let (Some(path), Some(fhir)) = (&args.fhir_mapping, &mappings.fhir) {
                crate::outln!(
                    "{} {}: {} template(s)",
                    paint(palette.ok, "valid"),
                    path.display(),
                    fhir.templates.len() + fhir.handlebars.len()
                );
                let mut listed: Vec<(usize, &str, &str, usize)> = fhir
                    .templates
                    .iter()
                    .map(|t| (t.index, "CodeValueFhir", t.type_name.as_str(), t.line))
                    .chain(
                        fhir.handlebars
                            .iter()
                            .map(|t| (t.index, "HandlebarsFhir", t.type_name.as_str(), t.line)),
                    )
                    .collect();
                listed.sort_unstable();
                for (index, kind, type_name, line) in listed {
                    crate::outln!("  template[{index}] {kind} '{type_name}' (line {line})");
                }
                for error in &unmapped {
                    crate::outln!("  {} {error}", paint(palette.hint, "warning:"));
                }
            }
        }
    }
    Ok(0)
}

fn import(args: &ImportArgs) -> anyhow::Result<u8> {
    use iomt_templates::export::{FoundMapping, find_mappings};
    let palette = Palette::new(args.color);
    let fail = |message: String| {
        eprintln!("{} {message}", paint(palette.bad, "error:"));
        Ok(EXIT_INVALID_TEMPLATE)
    };
    let (mut device, mut fhir): (Vec<FoundMapping>, Vec<FoundMapping>) = (Vec::new(), Vec::new());
    // An export holds both templates and little else: twice a template file's limit.
    let most = 2 * iomt_core::limits().template_file_bytes;
    for path in &args.exports {
        let text = read_at_most(path, most as u64)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if text.len() > most {
            return fail(format!("{}: larger than {most} bytes", path.display()));
        }
        let doc: Value = match serde_json::from_slice(&text) {
            Ok(doc) => doc,
            Err(e) => return fail(format!("{}: not JSON: {e}", path.display())),
        };
        match find_mappings(&doc) {
            Ok(found) => {
                device.extend(found.device);
                fhir.extend(found.fhir);
            }
            Err(e) => return fail(format!("{}: {e}", path.display())),
        }
    }
    let pick = |found: Vec<FoundMapping>, what: &str| -> Result<Option<FoundMapping>, String> {
        let mut chosen: Vec<FoundMapping> = found
            .into_iter()
            .filter(|m| {
                args.name
                    .as_deref()
                    .is_none_or(|n| m.name.as_deref().is_some_and(|name| name.contains(n)))
            })
            .collect();
        match chosen.len() {
            0 | 1 => Ok(chosen.pop()),
            _ => Err(format!(
                "{} {what} mappings found ({}): choose one with --name",
                chosen.len(),
                chosen
                    .iter()
                    .map(|m| m.name.clone().unwrap_or_else(|| m.path.clone()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    };
    let (device, fhir) = match (pick(device, "device"), pick(fhir, "FHIR")) {
        (Ok(Some(d)), Ok(Some(f))) => (d, f),
        (Err(e), _) | (_, Err(e)) => return fail(e),
        (Ok(None), _) => {
            return fail(
                "no device mapping found: export the iot-connector resource too".to_owned(),
            );
        }
        (_, Ok(None)) => {
            return fail(
                "no FHIR mapping found: export the connector's fhir-destination resource too"
                    .to_owned(),
            );
        }
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let files = [
        (args.out.join("devicecontent.json"), &device),
        (args.out.join("fhirmapping.json"), &fhir),
    ];
    for (file, _) in &files {
        if file.exists() && !args.force {
            return fail(format!(
                "{} exists: choose another --out, or --force",
                file.display()
            ));
        }
    }
    for (file, found) in &files {
        let mut text = serde_json::to_string_pretty(&found.content)?;
        text.push('\n');
        std::fs::write(file, text).with_context(|| format!("cannot write {}", file.display()))?;
        crate::outln!(
            "wrote {} from {}{}",
            file.display(),
            found.path,
            found
                .name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    if let Some(mode) = &fhir.identity_resolution {
        let iomt_mode = if mode.eq_ignore_ascii_case("create") {
            "create"
        } else {
            "lookup"
        };
        crate::outln!(
            "resourceIdentityResolutionType {mode}: set [identity] mode = \"{iomt_mode}\""
        );
    }
    validate(&ValidateArgs {
        device_mapping: files[0].0.clone(),
        fhir_mapping: Some(files[1].0.clone()),
        allow_unmapped_types: false,
        output: OutputFormat::Text,
        color: args.color,
    })
}

/// Reports every error of invalid mappings; the exit code says a template is invalid.
fn invalid_mapping(
    format: OutputFormat,
    palette: &Palette,
    errors: Vec<ReportedError>,
) -> anyhow::Result<u8> {
    match format {
        OutputFormat::Json => print_json(&[], errors)?,
        OutputFormat::Text => {
            crate::outln!(
                "{} {} error(s)",
                paint(palette.bad, "invalid mapping:"),
                errors.len()
            );
            for e in &errors {
                if let ReportedError::Template { file, error } = e {
                    crate::outln!("  {file}: {error}");
                }
            }
        }
    }
    Ok(EXIT_INVALID_TEMPLATE)
}

/// The document the templates run against, and the event's ingestion time if known.
struct Input {
    root: Value,
    ingestion: Option<Timestamp>,
    wrapped: bool,
}

fn load_input(args: &InputArgs) -> anyhow::Result<Result<Input, NormalizeError>> {
    let (path, wrap) = match (&args.message, &args.event) {
        (Some(p), _) => (p, true),
        (None, Some(p)) => (p, false),
        (None, None) => anyhow::bail!("pass --message or --event"),
    };
    let bytes = read_input(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(input_from(bytes, wrap, &path.display().to_string(), 1))
}

/// A message (`wrap`: a body to wrap as the service does) or a document to evaluate as is,
/// read from `name` at `line`.
fn input_from(
    bytes: Vec<u8>,
    wrap: bool,
    name: &str,
    line: usize,
) -> Result<Input, NormalizeError> {
    if wrap {
        let event = DeviceEvent {
            body: bytes,
            ..DeviceEvent::default()
        };
        return envelope(&event).map(|root| Input {
            root,
            ingestion: None,
            wrapped: true,
        });
    }
    let root = parse_body(&bytes)?;
    // A captured line whose body was not JSON (`BodyText`) is read as a replay reads it: its
    // body is parsed, and what a replay dead-letters is a data error here too. Any other
    // document is evaluated as it is.
    if root.get("BodyText").is_some() {
        return match iomt_files::capture::jsonl_record(bytes.trim_ascii(), name, line as i64) {
            iomt_files::capture::Record::Event(e) => envelope(&e.event).map(|root| Input {
                root,
                ingestion: e.event.enqueued_time,
                wrapped: false,
            }),
            iomt_files::capture::Record::Bad(bad) => Err(NormalizeError {
                kind: iomt_normalize::ErrorKind::InvalidDataFormat,
                message: bad.reason,
                template: None,
                path: None,
                line: None,
                expression: None,
            }),
        };
    }
    Ok(Input {
        ingestion: envelope_enqueued_time(&root),
        root,
        wrapped: false,
    })
}

/// The largest JSON Lines file `mapping test` reads as a batch.
const MAX_BATCH_BYTES: u64 = 256 << 20;

/// The messages of a batch: every `*.json` file of a folder (one message each) and every line
/// of its `*.jsonl` / `*.ndjson` files, or every line of a JSON Lines file; `None` for a file
/// holding one document (or that is not JSON at all: the single-message path reports it).
fn batch(path: &Path) -> anyhow::Result<Option<Vec<BatchItem>>> {
    if path == Path::new("-") {
        return Ok(None);
    }
    let read = |file: &Path| -> anyhow::Result<Vec<u8>> {
        let bytes = read_at_most(file, MAX_BATCH_BYTES)
            .with_context(|| format!("cannot read {}", file.display()))?;
        anyhow::ensure!(
            bytes.len() as u64 <= MAX_BATCH_BYTES,
            "{} is larger than {MAX_BATCH_BYTES} bytes",
            file.display()
        );
        Ok(bytes)
    };
    let lines = |file: &Path, bytes: &[u8]| -> Vec<BatchItem> {
        bytes
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, l)| !l.trim_ascii().is_empty())
            .map(|(i, l)| BatchItem {
                file: file.display().to_string(),
                line: Some(i + 1),
                bytes: l.trim_ascii().to_vec(),
            })
            .collect()
    };
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let mut items = Vec::new();
        for file in files {
            match file.extension().and_then(|e| e.to_str()) {
                Some("json") => items.push(BatchItem {
                    file: file.display().to_string(),
                    line: None,
                    bytes: read(&file)?,
                }),
                Some("jsonl" | "ndjson") => items.extend(lines(&file, &read(&file)?)),
                _ => {}
            }
        }
        return Ok(Some(items));
    }
    let bytes = read(path)?;
    if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
        return Ok(None);
    }
    let items = lines(path, &bytes);
    let first_is_json = items
        .first()
        .is_some_and(|i| serde_json::from_slice::<serde::de::IgnoredAny>(&i.bytes).is_ok());
    Ok((items.len() > 1 && first_is_json).then_some(items))
}

/// One message of a batch: a file, or a line of one.
struct BatchItem {
    file: String,
    line: Option<usize>,
    bytes: Vec<u8>,
}

/// One message's outcome in a batch.
#[derive(Debug, Serialize)]
struct BatchRow {
    source: String,
    measurements: usize,
    types: std::collections::BTreeMap<String, usize>,
    observations: usize,
    errors: Vec<ReportedError>,
}

/// Runs the mappings over every message of a batch: a table (or JSON) of each message's
/// measurements and errors, and totals.
fn test_batch(
    args: &TestArgs,
    palette: &Palette,
    mappings: Mappings,
    items: Vec<BatchItem>,
    wrap: bool,
) -> anyhow::Result<u8> {
    let fhir = mappings.fhir;
    let normalizer = Normalizer::new(mappings.device);
    let rows: Vec<BatchRow> = items
        .into_iter()
        .map(|item| {
            let source = match item.line {
                Some(line) => format!("{}:{line}", item.file),
                None => item.file.clone(),
            };
            let line = item.line.unwrap_or(1);
            let input = match input_from(item.bytes, wrap, &item.file, line) {
                Ok(input) => input,
                Err(e) => {
                    return BatchRow {
                        source,
                        measurements: 0,
                        types: Default::default(),
                        observations: 0,
                        errors: vec![ReportedError::Data(e)],
                    };
                }
            };
            let output = normalizer.normalize_value(
                &input.root,
                input.ingestion,
                &mut iomt_normalize::NoTrace,
            );
            let mut errors: Vec<ReportedError> =
                output.errors.into_iter().map(ReportedError::Data).collect();
            let observations = match &fhir {
                Some(fhir) => convert(fhir, &output.measurements, &mut errors).len(),
                None => 0,
            };
            let mut types = std::collections::BTreeMap::new();
            for m in &output.measurements {
                *types.entry(m.type_name.to_string()).or_default() += 1;
            }
            BatchRow {
                source,
                measurements: output.measurements.len(),
                types,
                observations,
                errors,
            }
        })
        .collect();
    let failed = rows.iter().filter(|r| !r.errors.is_empty()).count();
    let unmatched = rows
        .iter()
        .filter(|r| r.errors.is_empty() && r.measurements == 0)
        .count();
    let mut types = std::collections::BTreeMap::<&str, usize>::new();
    for r in &rows {
        for (t, n) in &r.types {
            *types.entry(t).or_default() += n;
        }
    }
    let measurements: usize = rows.iter().map(|r| r.measurements).sum();
    let observations: usize = rows.iter().map(|r| r.observations).sum();
    match args.output {
        OutputFormat::Json => {
            let report = serde_json::json!({
                "messages": rows,
                "totals": {"messages": rows.len(), "ok": rows.len() - failed - unmatched,
                    "withErrors": failed, "unmatched": unmatched, "measurements": measurements,
                    "observations": observations, "types": types},
            });
            crate::outln!("{}", serde_json::to_string_pretty(&report)?);
        }
        OutputFormat::Text => {
            let width = rows
                .iter()
                .map(|r| r.source.len())
                .max()
                .unwrap_or(7)
                .max(7);
            let mut text = String::new();
            writeln!(
                text,
                "{:<width$}  RESULT     MEASUREMENTS  DETAIL",
                "MESSAGE"
            )?;
            for r in &rows {
                let (result, detail) = match r.errors.first() {
                    Some(e) => (
                        paint(palette.bad, "error    "),
                        format!(
                            "{}{}",
                            batch_error(e),
                            if r.errors.len() > 1 {
                                format!(" (+{} more)", r.errors.len() - 1)
                            } else {
                                String::new()
                            }
                        ),
                    ),
                    None if r.measurements == 0 => {
                        (paint(palette.hint, "no match "), String::new())
                    }
                    None => (
                        paint(palette.ok, "ok       "),
                        r.types
                            .iter()
                            .map(|(t, n)| format!("{t} {n}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                };
                writeln!(
                    text,
                    "{:<width$}  {result}  {:>12}  {detail}",
                    r.source, r.measurements
                )?;
            }
            writeln!(
                text,
                "\n{} message(s): {} ok, {} with errors, {} matched no template; {measurements} measurement(s){}",
                rows.len(),
                rows.len() - failed - unmatched,
                failed,
                unmatched,
                if fhir.is_some() {
                    format!(", {observations} observation(s)")
                } else {
                    String::new()
                }
            )?;
            for (t, n) in &types {
                writeln!(text, "  {t:<20} {n:>10}")?;
            }
            crate::print_out(&text);
        }
    }
    Ok(if failed > 0 { EXIT_DATA_ERRORS } else { 0 })
}

/// An error in one line of the batch table.
fn batch_error(error: &ReportedError) -> String {
    match error {
        ReportedError::Data(e) => format!("{:?}: {}", e.kind, e.message),
        ReportedError::Convert { kind, message, .. } => format!("{kind}: {message}"),
        ReportedError::Input { message } => message.clone(),
        ReportedError::Template { file, error } => format!("{file}: {error}"),
    }
}

/// Reports a file that cannot be read; JSON output still gets its one JSON object.
fn unreadable(format: OutputFormat, error: &anyhow::Error) -> anyhow::Result<u8> {
    match format {
        OutputFormat::Json => print_json(
            &[],
            vec![ReportedError::Input {
                message: format!("{error:#}"),
            }],
        )?,
        OutputFormat::Text => eprintln!("error: {error:#}"),
    }
    Ok(EXIT_INVALID_TEMPLATE)
}

fn test(args: &TestArgs) -> anyhow::Result<u8> {
    let palette = Palette::new(args.color);
    let mappings = match load_or_report(
        args.output,
        &palette,
        &args.device_mapping,
        args.fhir_mapping.as_deref(),
    )? {
        Ok(m) => m,
        Err(code) => return Ok(code),
    };
    let (path, wrap) = match (&args.input.message, &args.input.event) {
        (Some(p), _) => (p, true),
        (None, Some(p)) => (p, false),
        (None, None) => anyhow::bail!("pass --message or --event"),
    };
    match batch(path) {
        Ok(Some(items)) => return test_batch(args, &palette, mappings, items, wrap),
        Ok(None) => {}
        Err(e) => return unreadable(args.output, &e),
    }
    let mapping = mappings.device;
    let loaded = match load_input(&args.input) {
        Ok(loaded) => loaded,
        Err(e) => return unreadable(args.output, &e),
    };
    let input = match loaded {
        Ok(input) => input,
        Err(error) => {
            match args.output {
                OutputFormat::Json => print_json(&[], vec![ReportedError::Data(error)])?,
                OutputFormat::Text => {
                    crate::outln!("{} {}", paint(palette.bad, "error:"), error.message)
                }
            }
            return Ok(EXIT_DATA_ERRORS);
        }
    };
    let normalizer = Normalizer::new(mapping);
    let mut recorder = Recorder::default();
    let output = match args.output {
        OutputFormat::Json => {
            normalizer.normalize_value(&input.root, input.ingestion, &mut iomt_normalize::NoTrace)
        }
        OutputFormat::Text => {
            normalizer.normalize_value(&input.root, input.ingestion, &mut recorder)
        }
    };
    let mut errors: Vec<ReportedError> = output
        .errors
        .iter()
        .cloned()
        .map(ReportedError::Data)
        .collect();
    let observations = match &mappings.fhir {
        Some(fhir) => convert(fhir, &output.measurements, &mut errors),
        None => Vec::new(),
    };
    let code = if errors.is_empty() {
        0
    } else {
        EXIT_DATA_ERRORS
    };
    match args.output {
        OutputFormat::Json => print_report(&output.measurements, observations, errors)?,
        OutputFormat::Text => {
            let mut text = render_text(
                &palette,
                &normalizer,
                &input,
                &recorder,
                &output,
                &args.device_mapping,
            )?;
            if mappings.fhir.is_some() {
                render_observations(&mut text, &palette, &observations, &errors)?;
            }
            crate::print_out(&text);
        }
    }
    Ok(code)
}

/// Groups the measurements as the pipeline does and converts each group with placeholder
/// Patient and Device ids (there is no FHIR server to resolve them).
fn convert(
    fhir: &FhirMapping,
    measurements: &[Measurement],
    errors: &mut Vec<ReportedError>,
) -> Vec<Value> {
    let mut observations = Vec::new();
    let issued = Timestamp::now();
    for group in MeasurementGroup::group(measurements.iter().cloned()) {
        let converted = fhir
            .lookup(&group.type_name)
            .ok_or_else(|| ConvertError::TemplateNotFound(group.type_name.to_string()))
            .and_then(|template| {
                let ids = ResourceIds::placeholders(&group);
                observation_groups(template.period_interval(), &group)?
                    .iter()
                    .map(|window| {
                        convert_window(template, window, &ids, &group, issued)
                            .map(mark_placeholders)
                    })
                    .collect::<Result<Vec<_>, _>>()
            });
        match converted {
            Ok(built) => observations.extend(built),
            Err(e) => errors.push(ReportedError::Convert {
                kind: e.name(),
                message: e.to_string(),
                type_name: group.type_name.to_string(),
            }),
        }
    }
    observations
}

/// Labels the references built from business identifiers, which a FHIR server would replace
/// with the resolved Patient and Device ids (and so change the identifier and id).
fn mark_placeholders(mut observation: Value) -> Value {
    for (key, what) in [
        ("subject", "Patient"),
        ("device", "Device"),
        ("encounter", "Encounter"),
    ] {
        if let Some(reference) = observation.get_mut(key).and_then(Value::as_object_mut) {
            reference.insert(
                "display".to_owned(),
                Value::String(format!(
                    "placeholder: no FHIR server; the {what} id is the business identifier from the message"
                )),
            );
        }
    }
    observation
}

fn render_observations(
    s: &mut String,
    p: &Palette,
    observations: &[Value],
    errors: &[ReportedError],
) -> std::fmt::Result {
    writeln!(
        s,
        "\n{} ({})",
        paint(p.heading, "observations"),
        observations.len()
    )?;
    for o in observations {
        let mut shown = o.clone();
        // Hourly SampledData holds thousands of slots; show the filled ones.
        abbreviate_data(&mut shown);
        if let Some(components) = shown.get_mut("component").and_then(Value::as_array_mut) {
            components.iter_mut().for_each(abbreviate_data);
        }
        writeln!(
            s,
            "{}",
            serde_json::to_string_pretty(&shown).unwrap_or_default()
        )?;
    }
    for e in errors {
        if let ReportedError::Convert { kind, message, .. } = e {
            writeln!(s, "  {} [{kind}] {message}", paint(p.bad, "✗"))?;
        }
    }
    Ok(())
}

fn abbreviate_data(holder: &mut Value) {
    if let Some(data) = holder.pointer_mut("/valueSampledData/data")
        && let Some(text) = data.as_str()
    {
        let tokens: Vec<&str> = text.split(' ').collect();
        let filled = tokens.iter().filter(|t| **t != "E").count();
        if tokens.len() > 12 {
            *data = Value::String(format!(
                "{} … ({} slots, {filled} filled)",
                tokens[..12].join(" "),
                tokens.len()
            ));
        }
    }
}

/// What the evaluation did, template by template, for the text report.
#[derive(Debug, Default)]
struct Recorder {
    templates: Vec<TemplateRecord>,
    current_token: usize,
}

#[derive(Debug)]
struct TemplateRecord {
    index: usize,
    tokens: Vec<TokenRecord>,
}

#[derive(Debug, Default)]
struct TokenRecord {
    preview: String,
    expressions: Vec<(String, String, Option<Value>)>,
}

impl Trace for Recorder {
    fn type_match(&mut self, template: &ContentTemplate, matches: &[Cow<'_, Value>]) {
        let tokens = matches
            .iter()
            .map(|m| TokenRecord {
                preview: preview(m),
                expressions: Vec::new(),
            })
            .collect();
        self.templates.push(TemplateRecord {
            index: template.index,
            tokens,
        });
    }

    fn token(&mut self, _template: &ContentTemplate, index: usize) {
        self.current_token = index;
    }

    fn expression(
        &mut self,
        _template: &ContentTemplate,
        field: &str,
        expression: &Expression,
        token: Option<&Value>,
    ) {
        if let Some(tok) = self
            .templates
            .last_mut()
            .and_then(|t| t.tokens.get_mut(self.current_token))
        {
            tok.expressions.push((
                field.to_owned(),
                expression.as_str().to_owned(),
                token.cloned(),
            ));
        }
    }
}

fn preview(v: &Value) -> String {
    explain::preview(v, 100)
}

fn render_text(
    p: &Palette,
    normalizer: &Normalizer,
    input: &Input,
    rec: &Recorder,
    output: &Output,
    mapping_path: &Path,
) -> Result<String, std::fmt::Error> {
    let mut s = String::new();
    let templates = &normalizer.mapping().templates;
    writeln!(
        s,
        "{} {} ({} template(s))",
        paint(p.heading, "device mapping"),
        mapping_path.display(),
        templates.len()
    )?;
    let how = if input.wrapped {
        "message, wrapped as {Body, Properties, SystemProperties}"
    } else {
        "document evaluated as is"
    };
    writeln!(s, "{} {how}\n", paint(p.heading, "input"))?;
    for (t, r) in templates.iter().zip(&rec.templates) {
        debug_assert_eq!(t.index, r.index);
        if r.tokens.is_empty() {
            writeln!(
                s,
                "{} {}  {}",
                paint(p.bad, "✗"),
                t.label(),
                paint(p.bad, "no match")
            )?;
            writeln!(
                s,
                "    typeMatchExpression {} (line {}) selected nothing:",
                t.type_match.as_str(),
                t.type_match.line.unwrap_or(t.line)
            )?;
            for hint in explain::why_no_match(t, &input.root) {
                writeln!(s, "    {} {}", paint(p.hint, "-"), paint(p.hint, hint))?;
            }
            continue;
        }
        writeln!(
            s,
            "{} {}  matched {} token(s)",
            paint(p.ok, "✓"),
            t.label(),
            r.tokens.len()
        )?;
        for (i, tok) in r.tokens.iter().enumerate() {
            writeln!(s, "    match {}: {}", i + 1, paint(p.dim, &tok.preview))?;
            for (field, expr, value) in &tok.expressions {
                let shown = match value {
                    Some(v) => preview(v),
                    None => paint(p.hint, "(nothing)"),
                };
                writeln!(s, "      {field:<22} {}  → {shown}", paint(p.dim, expr))?;
            }
        }
    }
    writeln!(
        s,
        "\n{} ({})",
        paint(p.heading, "measurements"),
        output.measurements.len()
    )?;
    for m in &output.measurements {
        let props: Vec<String> = m
            .properties
            .iter()
            .map(|pr| format!("{}={}", pr.name, pr.value))
            .collect();
        let mut ids = format!("device={}", m.device_id);
        for (k, v) in [
            ("patient", &m.patient_id),
            ("encounter", &m.encounter_id),
            ("correlation", &m.correlation_id),
        ] {
            if let Some(v) = v {
                write!(ids, " {k}={v}")?;
            }
        }
        writeln!(
            s,
            "  {}  {}  {ids}  {}",
            paint(p.ok, &m.type_name),
            m.occurrence_time_utc,
            props.join(" ")
        )?;
    }
    if output.errors.is_empty() {
        writeln!(s, "\n{} none", paint(p.heading, "errors"))?;
    } else {
        writeln!(s, "\n{} ({})", paint(p.bad, "errors"), output.errors.len())?;
        for e in &output.errors {
            let mut at = String::new();
            if let Some(t) = &e.template {
                write!(at, "{t}")?;
            }
            if let Some(path) = &e.path {
                write!(at, ", {path}")?;
            }
            if let Some(line) = e.line {
                write!(at, " (line {line})")?;
            }
            writeln!(
                s,
                "  {} [{}] {}",
                paint(p.bad, "✗"),
                e.kind.name(),
                e.message
            )?;
            if !at.is_empty() {
                writeln!(s, "      {}", paint(p.dim, at))?;
            }
        }
    }
    Ok(s)
}
