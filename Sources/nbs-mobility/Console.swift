import ArgumentParser
import Dispatch
import Foundation
import Logging
import NIOConcurrencyHelpers
import Synchronization

struct ViewOptions: ParsableArguments {
    @Option(name: .long, help: "auto (live on a terminal, plain lines otherwise), live, lines or off. With --json, off unless given.")
    var view: ViewMode = .auto

    @Flag(name: .long, help: "Open no control socket (then `nbs-mobility status` does not see this process).")
    var noControl = false

    /// Scripts that ask for --json get only the JSON, unless they also ask for a view: the JSON
    /// object stays the last line either way.
    func resolved(json: Bool) -> ViewMode { json && view == .auto ? .off : view }
}

/// What one `serve`, `connect` or `cat` run shows and answers while it runs: the live view and the
/// control socket for `status`. Sessions are sampled only while someone looks: a few times a second
/// while a view (live or lines) is drawn, and once per `status` request. Sampling costs two hops to
/// each session's event loop; done 4 times a second for 10,000 idle sessions of a `serve` with the
/// view off, that was 80,000 hops a second for nobody.
final class Console: Sendable {
    let registry: SessionRegistry
    let view: LiveView
    private let ticking: Task<Void, Never>?
    static let period: Duration = .milliseconds(250)
    private let control: ControlServer?

    private init(registry: SessionRegistry, view: LiveView, control: ControlServer?) {
        self.registry = registry
        self.view = view
        self.control = control
        guard view.mode != .off else {
            ticking = nil
            return
        }
        // Sample, then draw: a frame never shows counters older than the frame.
        ticking = Task {
            while !Task.isCancelled {
                await registry.refresh()
                view.draw()
                try? await Task.sleep(for: Self.period)
            }
        }
    }

    static func start(command: String, localName: String, port: Int?, view mode: ViewMode, output: Int32 = STDOUT_FILENO, control wanted: Bool) async -> Console {
        let registry = SessionRegistry(command: command, localName: localName, port: port)
        var control: ControlServer?
        if wanted {
            do {
                control = try await ControlServer.start(path: try ControlDirectory.socketPath(), registry: registry)
            } catch {
                // `status` is a convenience: the transfer goes on without it.
                FileHandle.standardError.write(Data("nbs-mobility: no control socket, `status` will not see this process: \(error)\n".utf8))
            }
        }
        let console = Console(registry: registry, view: LiveView(mode: mode.resolved(isTerminal: Terminal.isTerminal(output)), registry: registry, output: output), control: control)
        Interruption.install(cleanup: control?.path)
        if console.view.mode == .live { ViewAwareLogHandler.route(to: console.view) }
        return console
    }

    /// The final frame (the cursor visible again) and the control socket removed.
    func stop() async {
        ticking?.cancel()
        await ticking?.value
        if view.mode != .off { await registry.refresh() }
        ViewAwareLogHandler.route(to: nil)
        view.finish()
        await control?.close()
        Interruption.install(cleanup: nil)
    }
}

/// Ctrl-C or SIGTERM during a live view must not leave the terminal without a cursor, nor a
/// control socket behind.
enum Interruption {
    private static let state = Mutex<(sources: [any DispatchSourceSignal], socket: String?)>(([], nil))

    static func install(cleanup socket: String?) {
        state.withLock { s in
            s.socket = socket
            guard s.sources.isEmpty else { return }
            for signalNumber in [SIGINT, SIGTERM] {
                signal(signalNumber, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
                source.setEventHandler {
                    Terminal.restoreCursor()
                    if let socket = state.withLock({ $0.socket }) { unlink(socket) }
                    exit(128 + signalNumber)
                }
                source.resume()
                s.sources.append(source)
            }
        }
    }
}

/// Library logs go to stderr, except while a live table is drawn on the terminal: a line written
/// into the middle of the redraw would shift it and leave stale rows behind, so they are printed
/// above the table instead.
struct ViewAwareLogHandler: LogHandler {
    private static let liveView = NIOLockedValueBox<LiveView?>(nil)
    private var stream: StreamLogHandler
    private let label: String

    init(label: String, level: Logger.Level) {
        self.label = label
        stream = StreamLogHandler.standardError(label: label)
        stream.logLevel = level
    }

    static func route(to view: LiveView?) { liveView.withLockedValue { $0 = view } }

    var logLevel: Logger.Level {
        get { stream.logLevel }
        set { stream.logLevel = newValue }
    }

    var metadata: Logger.Metadata {
        get { stream.metadata }
        set { stream.metadata = newValue }
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { stream[metadataKey: key] }
        set { stream[metadataKey: key] = newValue }
    }

    func log(event: LogEvent) {
        if let view = Self.liveView.withLockedValue({ $0 }) {
            view.printPermanent("\(event.level) \(label): \(event.message)")
        } else {
            stream.log(event: event)
        }
    }
}
