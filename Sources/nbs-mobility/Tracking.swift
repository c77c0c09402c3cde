import Foundation
import NameBasedSockets
import NIOConcurrencyHelpers
import Synchronization

/// One subflow as the live view and `status` show it: the library's view plus rates measured here.
struct SubflowRow: Sendable, Equatable {
    var info: SubflowInfo
    /// Mbit/s over the last sampling period, smoothed.
    var sendMbps: Double
    var receiveMbps: Double
}

/// A session's state at one instant, with rates computed from the previous sample.
struct SessionSample: Sendable {
    var at: ContinuousClock.Instant
    var subflows: [SubflowRow]
    var statistics: SessionStatistics

    var sendMbps: Double { subflows.reduce(0) { $0 + $1.sendMbps } }
    var receiveMbps: Double { subflows.reduce(0) { $0 + $1.receiveMbps } }

    /// Rates are differences of the subflows' byte counters between two samples, smoothed with a
    /// time constant of about a second so a 4 Hz refresh does not jitter.
    static func next(after previous: SessionSample?, subflows: [SubflowInfo], statistics: SessionStatistics,
                     at now: ContinuousClock.Instant, smoothing: Duration = .seconds(1)) -> SessionSample {
        let rows = subflows.map { info -> SubflowRow in
            guard let previous, let before = previous.subflows.first(where: { $0.info.id == info.id }) else {
                return SubflowRow(info: info, sendMbps: 0, receiveMbps: 0)
            }
            let dt = (now - previous.at).seconds
            guard dt > 0 else { return before.with(info) }
            let weight = min(1, dt / smoothing.seconds)
            func rate(_ now: Int, _ then: Int, _ old: Double) -> Double {
                let instant = Double(max(0, now - then)) * 8 / dt / 1e6
                return old + (instant - old) * weight
            }
            return SubflowRow(info: info, sendMbps: rate(info.bytesSent, before.info.bytesSent, before.sendMbps),
                              receiveMbps: rate(info.bytesReceived, before.info.bytesReceived, before.receiveMbps))
        }
        return SessionSample(at: now, subflows: rows, statistics: statistics)
    }
}

extension SubflowRow {
    fileprivate func with(_ info: SubflowInfo) -> SubflowRow { SubflowRow(info: info, sendMbps: sendMbps, receiveMbps: receiveMbps) }
}

/// A session of this process as the live view, `status` and the final report see it: its events
/// (consumed here, the stream has one reader), its latest sample and the transfer's progress.
final class TrackedSession: Sendable {
    let id: Int
    let session: Session
    let role: String
    let started = ContinuousClock.now
    /// Bytes the transfer means to move, when known (`connect --bytes`): the progress bar's end.
    let expectedBytes: Int?
    let progressKind: ProgressKind
    private let progress = Atomic<Int>(0)
    private let state = NIOLockedValueBox(State())
    private let eventTask: Task<Void, Never>

    /// A session that moves data for hours must not grow without bound.
    static let eventLimit = 10_000

    private struct State {
        var events: [(t: Double, event: SessionEvent)] = []
        var droppedEvents = 0
        var sample: SessionSample?
        var finished: String?
    }

    /// What the progress counts: a sender's bytes count once the peer acknowledged them (written
    /// but unacknowledged bytes sit in the send buffer), a receiver's once the application read them.
    enum ProgressKind: String, Sendable {
        case sent
        case received
    }

    init(id: Int, session: Session, role: String, progress kind: ProgressKind, expectedBytes: Int? = nil) {
        self.id = id
        self.session = session
        self.role = role
        self.progressKind = kind
        self.expectedBytes = expectedBytes
        let start = started
        let state = self.state
        eventTask = Task {
            for await event in session.events {
                let t = (ContinuousClock.now - start).seconds
                state.withLockedValue {
                    if $0.events.count < Self.eventLimit { $0.events.append((t, event)) } else { $0.droppedEvents += 1 }
                }
            }
        }
    }

    /// Bytes the application wrote (`.sent`) or read (`.received`) so far.
    func addProgress(_ bytes: Int) { progress.add(bytes, ordering: .relaxed) }

    /// The progress as the view shows it, per `progressKind`.
    func bytesDone(_ sample: SessionSample?) -> Int {
        let counted = progress.load(ordering: .relaxed)
        guard progressKind == .sent else { return counted }
        return max(0, counted - (sample?.statistics.unacknowledgedBytes ?? 0))
    }

    var sample: SessionSample? { state.withLockedValue { $0.sample } }
    /// Set once the session is over: "completed" or the error.
    var finished: String? { state.withLockedValue { $0.finished } }
    func markFinished(_ outcome: String) { state.withLockedValue { $0.finished = outcome } }

    /// Events from index `from` on, and the index to ask from next time.
    func events(from index: Int) -> (events: [(t: Double, event: SessionEvent)], next: Int) {
        state.withLockedValue { s in
            let start = min(max(0, index), s.events.count)
            return (Array(s.events[start...]), s.events.count)
        }
    }

    /// Every event, once the session's stream has ended (the session is closed or failed).
    var allEvents: [(t: Double, event: SessionEvent)] {
        get async {
            await eventTask.value
            return state.withLockedValue { $0.events }
        }
    }

    /// Reads the session's subflows and counters and folds them into a new sample.
    func refresh() async {
        let subflows = await session.subflows
        let statistics = await session.statistics
        let now = ContinuousClock.now
        state.withLockedValue { $0.sample = SessionSample.next(after: $0.sample, subflows: subflows, statistics: statistics, at: now) }
    }
}

/// The sessions of this process, for the live view and the control socket.
final class SessionRegistry: Sendable {
    private let state = NIOLockedValueBox<(next: Int, sessions: [Int: TrackedSession])>((1, [:]))
    let command: String
    let localName: String
    let port: Int?
    let started = ContinuousClock.now
    let startedAt = Date()

    init(command: String, localName: String, port: Int?) {
        self.command = command
        self.localName = localName
        self.port = port
    }

    func track(_ session: Session, role: String, progress: TrackedSession.ProgressKind, expectedBytes: Int? = nil) -> TrackedSession {
        state.withLockedValue { s in
            let tracked = TrackedSession(id: s.next, session: session, role: role, progress: progress, expectedBytes: expectedBytes)
            s.sessions[s.next] = tracked
            s.next += 1
            return tracked
        }
    }

    func forget(_ tracked: TrackedSession) { state.withLockedValue { _ = $0.sessions.removeValue(forKey: tracked.id) } }

    var sessions: [TrackedSession] { state.withLockedValue { $0.sessions.values.sorted { $0.id < $1.id } } }

    /// The live view and `status` read these samples, so neither waits on a session's event loop.
    /// All sessions at once: one after the other, 2,000 idle sessions took over 2 s (two event-loop
    /// round trips each), longer than `status` waits for an answer.
    func refresh() async {
        await withTaskGroup(of: Void.self) { group in
            for tracked in sessions { group.addTask { await tracked.refresh() } }
        }
    }
}

/// One subflow in the live view and in `status --json` (snake_case keys).
struct SubflowStatus: Codable, Sendable, Equatable {
    var id: UInt32
    var local: String
    var remote: String
    var interface: String?
    /// The library's state: connecting, active, stalled, backup, closed.
    var state: String
    /// What the view calls it: joining, active, probing, backup, retired.
    var view: String
    var rttMs: Double?
    var bytesSent: Int
    var bytesReceived: Int
    var reinjectedBytes: Int
    var sendMbps: Double
    var recvMbps: Double
    var closeReason: String?
    var datagramSize: Int?

    init(_ row: SubflowRow) {
        let s = row.info
        id = s.id
        local = s.local.ipAddress ?? "?"
        remote = s.remote.ipAddress ?? "?"
        interface = s.interface
        state = s.state.rawValue
        view = displayState(s.state)
        rttMs = s.rttMilliseconds.map(round3)
        bytesSent = s.bytesSent
        bytesReceived = s.bytesReceived
        reinjectedBytes = s.reinjectedBytes
        sendMbps = round3(row.sendMbps)
        recvMbps = round3(row.receiveMbps)
        closeReason = s.closeReason
        datagramSize = s.datagramSize
    }
}

struct SessionStatus: Codable, Sendable {
    var id: Int
    var role: String
    var localName: String
    var peerName: String
    var port: Int
    var peerVerification: String
    var elapsedS: Double
    var expectedBytes: Int?
    /// Acknowledged by the peer (`progress` "sent") or read (`progress` "received").
    var bytesDone: Int
    var progress: String
    var finished: String?
    var sendMbps: Double
    var recvMbps: Double
    var reinjectedBytes: Int
    var subflows: [SubflowStatus]
}

/// What `status` gets from a running `serve`, `connect` or `cat` over its control socket.
struct ProcessStatus: Codable, Sendable {
    var pid: Int32
    var command: String
    var localName: String
    var port: Int?
    var uptimeS: Double
    var sessions: [SessionStatus]
}

extension TrackedSession {
    func status(now: ContinuousClock.Instant = .now) -> SessionStatus {
        let sample = self.sample
        return SessionStatus(id: id, role: role, localName: session.localName, peerName: session.peerName, port: session.port,
                             peerVerification: session.peerVerification.rawValue, elapsedS: round3((now - started).seconds),
                             expectedBytes: expectedBytes, bytesDone: bytesDone(sample), progress: progressKind.rawValue, finished: finished,
                             sendMbps: round3(sample?.sendMbps ?? 0), recvMbps: round3(sample?.receiveMbps ?? 0),
                             reinjectedBytes: sample?.statistics.reinjectedBytes ?? 0, subflows: (sample?.subflows ?? []).map(SubflowStatus.init))
    }
}

extension SessionRegistry {
    func status(now: ContinuousClock.Instant = .now) -> ProcessStatus {
        ProcessStatus(pid: getpid(), command: command, localName: localName, port: port, uptimeS: round3((now - started).seconds),
                      sessions: sessions.map { $0.status(now: now) })
    }
}

extension JSONEncoder {
    static var snakeCase: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.sortedKeys]
        return encoder
    }
}

extension JSONDecoder {
    static var snakeCase: JSONDecoder {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return decoder
    }
}
