import Logging
import NIOCore

/// Staggered open attempts (Happy Eyeballs, RFC 8305, for pairs of addresses): `NBS.open` starts
/// the next pair's connect when the attempts in flight have not reached the peer within
/// `NBSOptions.openAttemptDelay`, and only one attempt at a time ever sends OPEN. Racing whole
/// handshakes would let two OPENs reach the listener, which admits each as a session of its own
/// and hands both to its application; racing the connects alone cannot, since OPEN leaves only on
/// a connection already up. The exception is a Fast Open connect, whose OPEN rides in its SYN: it
/// claims at once, and a racer (which never uses Fast Open) that connects while that SYN is still
/// unanswered takes over from it.
final class OpenRace: @unchecked Sendable {
    // Touched on `loop` only; `@unchecked` for the task group that holds it.
    private let loop: any EventLoop
    private var attempts: [Int: OpenAttempt] = [:]
    private var claimant: Int?
    private var ended = false

    init(loop: any EventLoop) {
        self.loop = loop
    }

    /// An attempt that lost: it sent no OPEN (or its Fast Open SYN was never answered), so the
    /// listener has no session of it and its pair may be tried again.
    struct Superseded: Error {
        /// It had a connection: the pair works and is the best to try next.
        var connected: Bool
    }

    /// What a connected attempt may do, given the claimant's state.
    enum Claim: Equatable {
        case open
        /// The claimant's Fast Open SYN (its OPEN in it) is still unanswered: it gives way.
        case openReplacing(Int)
        case superseded
    }

    static func claim(claimant: (index: Int, synUnanswered: Bool)?) -> Claim {
        guard let claimant else { return .open }
        return claimant.synUnanswered ? .openReplacing(claimant.index) : .superseded
    }

    private enum Outcome: Sendable {
        case opened(Int, Session)
        case failed(Int, any Error)
        /// Carries the count of attempts started when it was armed: a later start re-arms it.
        case staggerElapsed(Int)
    }

    /// Runs `attempt` over `pairs` in order until one gives a session: one at a time, or, with
    /// `stagger`, the next beside those in flight when none has reached the peer within it. A peer
    /// that answers but refuses is final; one that cannot be reached is tried at the next pair.
    static func first(of pairs: [PathPlanner.Join], on loop: any EventLoop, stagger: TimeAmount?, options: NBSOptions, peerName: String,
                      attempt: @escaping @Sendable (OpenRace, Int, PathPlanner.Join, NBSOptions) async throws -> Session) async throws -> Session {
        let race = OpenRace(loop: loop)
        // A cancelled open closes its attempts at once rather than at their next timeout.
        return try await withTaskCancellationHandler {
            try await withThrowingTaskGroup(of: Outcome.self) { group in
                var queue = Array(pairs.enumerated()), running = 0, started = 0
                var failures: [String] = []
                // A close without a byte in answer is what a legacy server does, but also what an NBS
                // listener does to an OPEN that a blackhole or a full accept queue held past its
                // `legacyDetectionDelay`: it is final only once no other address is left to try.
                var closedUnanswered: NBSError?
                func startNext() {
                    let (index, pair) = queue.removeFirst()
                    // A racer never sends its OPEN in a Fast Open SYN: only a connection known to be up may carry one.
                    var racerOptions = options
                    if running > 0 {
                        racerOptions.tcpFastOpen = false
                        Logger(label: "nbs.open").info("no answer yet over \(running) pair(s) to \(peerName): pair \(index + 1), \(pair.local.hostString) → \(pair.remote.hostString), starts beside")
                    }
                    let attemptOptions = racerOptions
                    running += 1
                    started += 1
                    group.addTask {
                        do {
                            return .opened(index, try await attempt(race, index, pair, attemptOptions))
                        } catch {
                            return .failed(index, error)
                        }
                    }
                    armStagger()
                }
                // RFC 8305: the delay runs from the latest attempt's start.
                func armStagger() {
                    guard let stagger, !queue.isEmpty else { return }
                    let armedAt = started
                    group.addTask {
                        try? await Task.sleep(nanoseconds: UInt64(max(0, stagger.nanoseconds)))
                        return .staggerElapsed(armedAt)
                    }
                }
                func giveUp(_ error: any Error) async throws -> Never {
                    try await race.end(keeping: nil).get()
                    group.cancelAll()
                    throw error
                }
                startNext()
                while let outcome = try await group.next() {
                    if Task.isCancelled {
                        if case .opened(_, let session) = outcome { await session.abort(reason: "the open was cancelled") }
                        try await giveUp(CancellationError())
                    }
                    switch outcome {
                    case .opened(let index, let session):
                        // The losers close without sending anything more; the group waits for them.
                        try await race.end(keeping: index).get()
                        group.cancelAll()
                        return session
                    case .staggerElapsed(let armedAt):
                        guard armedAt == started, !queue.isEmpty else { continue }
                        if try await race.peerReached().get() { continue }  // its failure starts the next
                        startNext()
                    case .failed(let index, let error):
                        running -= 1
                        let pair = pairs[index]
                        if let superseded = error as? Superseded {
                            // Tried again after the others: first if its connection was up.
                            if superseded.connected { queue.insert((index, pair), at: 0) } else { queue.append((index, pair)) }
                            if running == 0 { startNext() } else { armStagger() }
                            continue
                        }
                        switch error {
                        case let closed as OpenAttempt.ClosedUnanswered:
                            closedUnanswered = closed.error
                        case let error as NBSError:
                            switch error {
                            case .refused, .handshakeFailed, .protocolViolation, .verificationFailed, .legacyPeer:
                                try await giveUp(error)
                            default:
                                failures.append("\(pair.local.hostString) → \(pair.remote.hostString): \(error)")
                            }
                        default:
                            failures.append("\(pair.local.hostString) → \(pair.remote.hostString): \(readableSocketError(error))")
                        }
                        if !queue.isEmpty {
                            startNext()
                        } else if running == 0 {
                            group.cancelAll()
                            // Another address answered nothing at all: the one that closed is the better account.
                            if let closedUnanswered { throw closedUnanswered }
                            throw NBSError.connectFailed(peer: peerName, reason: failures.joined(separator: "; "))
                        }
                    }
                }
                throw NBSError.connectFailed(peer: peerName, reason: failures.joined(separator: "; "))
            }
        } onCancel: {
            _ = race.end(keeping: nil)
        }
    }

    func register(_ index: Int, _ attempt: OpenAttempt) {
        loop.preconditionInEventLoop()
        attempts[index] = attempt
        if ended { attempt.abandon(Superseded(connected: false)) }
    }

    /// Called by a connected attempt before it writes OPEN; fails with `Superseded` if it must not.
    func claim(_ index: Int) -> EventLoopFuture<Void> {
        loop.preconditionInEventLoop()
        guard !ended else { return loop.makeFailedFuture(Superseded(connected: true)) }
        return claimantSynUnanswered().flatMapThrowing { [self] unanswered in
            guard !ended else { throw Superseded(connected: true) }
            switch Self.claim(claimant: claimant.map { ($0, unanswered) }) {
            case .open:
                claimant = index
            case .openReplacing(let previous):
                Logger(label: "nbs.open").info("the Fast Open SYN of open pair \(previous + 1) is still unanswered: pair \(index + 1), connected, takes over")
                attempts[previous]?.abandon(Superseded(connected: false))
                claimant = index
            case .superseded:
                throw Superseded(connected: true)
            }
        }
    }

    /// The claimant's attempt ended (a failure of its own): the next connected attempt may open.
    func release(_ index: Int) {
        loop.preconditionInEventLoop()
        attempts[index] = nil
        if claimant == index { claimant = nil }
    }

    /// Whether an attempt in flight has reached the peer, so that starting another would only race it.
    func peerReached() -> EventLoopFuture<Bool> {
        loop.flatSubmit { [self] in
            guard claimant != nil else { return loop.makeSucceededFuture(false) }
            return claimantSynUnanswered().map { !$0 }
        }
    }

    /// One attempt won (or the open gave up): every other one closes, sending nothing more.
    func end(keeping winner: Int?) -> EventLoopFuture<Void> {
        loop.submit { [self] in
            ended = true
            for (index, attempt) in attempts where index != winner {
                attempt.abandon(Superseded(connected: false))
            }
        }
    }

    /// A Fast Open claimant's SYN carried its OPEN; until the kernel has the SYN-ACK, the listener
    /// may never have seen either. A plain connect that completed has had its answer.
    private func claimantSynUnanswered() -> EventLoopFuture<Bool> {
        guard let claimant, let attempt = attempts[claimant], attempt.connectDeferred,
            let provider = attempt.channel as? any SocketOptionProvider
        else { return loop.makeSucceededFuture(false) }
        return provider.getKernelTCPInfo().map { $0.state == KernelTCPInfo.synSent }.recover { _ in false }
    }
}
