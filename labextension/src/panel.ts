import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import {
  formatCredits,
  formatQuota,
  formatSpec,
  formatSSH,
  formatUptime
} from './format';
import { TwargaAPIError } from './handler';
import { TwargaModel } from './model';
import { ICreateVM, IVM, VMAction, VMStatus } from './types';

/** The fields of the create form, in the order they are shown. */
const CREATE_FIELDS = ['name', 'image', 'ram', 'cpu', 'disk'] as const;
type CreateField = (typeof CREATE_FIELDS)[number];

/** The buttons of a VM row. `console` is not an API action: it opens a tab. */
type RowAction = 'start' | 'stop' | 'restart' | 'destroy' | 'console';
const ROW_ACTIONS: { action: RowAction; label: string; title: string }[] = [
  { action: 'start', label: 'Start', title: 'Start the VM' },
  { action: 'stop', label: 'Stop', title: 'Shut the VM down' },
  { action: 'restart', label: 'Restart', title: 'Reboot the VM' },
  { action: 'destroy', label: 'Destroy', title: 'Delete the VM and its disk' },
  {
    action: 'console',
    label: 'Console',
    title: "Open the VM's serial console in a tab"
  }
];

/** Which buttons make sense in which status. */
const ENABLED: Record<RowAction, readonly VMStatus[]> = {
  start: ['stopped', 'error'],
  stop: ['running', 'starting', 'paused'],
  restart: ['running'],
  destroy: [
    'pending',
    'starting',
    'running',
    'paused',
    'stopping',
    'stopped',
    'error'
  ],
  console: ['running']
};

/**
 * The "Twarga Lab" side panel: my credits and quota, my VMs with their buttons, and a
 * form to create one. Renders `TwargaModel`; every change goes through the model.
 */
export class TwargaPanel extends Widget {
  constructor(options: TwargaPanel.IOptions) {
    super();
    this._model = options.model;
    this._openConsole = options.openConsole;
    this.id = 'twarga-lab-panel';
    this.addClass('twarga-panel');
    this.title.caption = 'Twarga Lab';

    const header = element('div', 'twarga-header');
    header.appendChild(element('h2', 'twarga-title', 'Twarga Lab'));
    this._user = header.appendChild(element('span', 'twarga-user'));
    this.node.appendChild(header);

    const account = element('div', 'twarga-account');
    this._credits = account.appendChild(
      element('div', 'twarga-credits', 'Credits: …')
    );
    this._quota = account.appendChild(element('div', 'twarga-quota'));
    this.node.appendChild(account);

    this._serviceStatus = element('div', 'twarga-service-status');
    this._serviceStatus.setAttribute('role', 'status');
    this.node.appendChild(this._serviceStatus);

    const list = element('section', 'twarga-section');
    list.appendChild(element('h3', 'twarga-section-title', 'My VMs'));
    this._empty = list.appendChild(element('div', 'twarga-empty', 'Loading…'));
    this._list = list.appendChild(element('div', 'twarga-vm-list'));
    this.node.appendChild(list);

    this._form = this._buildForm();
    this.node.appendChild(this._form);

    this._model.changed.connect(this._render, this);
    this._render();
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const model = this._model;
    const me = model.me;
    this.node.dataset.service = model.serviceError
      ? 'down'
      : model.loaded
        ? 'up'
        : 'loading';

    if (model.serviceError) {
      this._serviceStatus.textContent = `${model.serviceError} Retrying automatically…`;
      this._serviceStatus.hidden = false;
    } else {
      this._serviceStatus.textContent = '';
      this._serviceStatus.hidden = true;
    }

    if (me) {
      this._user.textContent = me.admin ? `${me.name} (admin)` : me.name;
      this._credits.textContent = `Credits: ${formatCredits(me.credits)}`;
      this._quota.textContent = formatQuota(me);
    }

    this._renderVMs();
    this._renderImages();
  }

  private _renderVMs(): void {
    const vms = this._model.vms;
    const seen = new Set<number>();
    vms.forEach((vm, index) => {
      seen.add(vm.id);
      let row = this._rows.get(vm.id);
      if (!row) {
        row = new VMRow(vm, (action, r) => void this._onRowAction(action, r));
        this._rows.set(vm.id, row);
      }
      row.update(vm);
      // Keep DOM order equal to the API's order without rebuilding rows (a click in
      // flight on a rebuilt button would be lost).
      if (this._list.children[index] !== row.node) {
        this._list.insertBefore(row.node, this._list.children[index] ?? null);
      }
    });
    for (const [id, row] of this._rows) {
      if (!seen.has(id)) {
        row.node.remove();
        this._rows.delete(id);
      }
    }
    if (vms.length > 0) {
      this._empty.hidden = true;
    } else {
      this._empty.hidden = false;
      this._empty.textContent = this._model.loaded
        ? 'No VMs yet: create one below.'
        : this._model.serviceError
          ? 'Your VMs will show here when Twarga Lab answers.'
          : 'Loading…';
    }
  }

  private _renderImages(): void {
    const select = this._inputs.image as HTMLSelectElement;
    const names = this._model.images.map(image => image.name);
    const current = Array.from(select.options).map(option => option.value);
    if (names.length === 0 || names.join('\n') === current.join('\n')) {
      return;
    }
    const selected = select.value;
    select.replaceChildren(
      ...this._model.images.map(image => {
        const option = document.createElement('option');
        option.value = image.name;
        option.textContent = image.name;
        option.title = image.description;
        return option;
      })
    );
    const fallback = this._model.images.find(image => image.default)?.name;
    if (names.includes(selected)) {
      select.value = selected;
    } else if (fallback) {
      select.value = fallback;
    }
  }

  private async _onRowAction(action: RowAction, row: VMRow): Promise<void> {
    const vm = row.vm;
    if (action === 'console') {
      this._openConsole(vm);
      return;
    }
    if (action === 'destroy') {
      const answer = await showDialog({
        title: `Destroy ${vm.name}?`,
        body: `This deletes the VM "${vm.name}" and its disk. It cannot be undone.`,
        buttons: [
          Dialog.cancelButton(),
          Dialog.warnButton({ label: 'Destroy' })
        ]
      });
      if (!answer.button.accept) {
        return;
      }
    }
    row.setBusy(true);
    try {
      if (action === 'destroy') {
        await this._model.destroyVM(vm.id);
      } else {
        await this._model.act(vm.id, action as VMAction);
      }
      row.setError(null);
    } catch (error) {
      row.setError(messageOf(error));
    } finally {
      row.setBusy(false);
    }
  }

  private _buildForm(): HTMLFormElement {
    const form = element('form', 'twarga-create') as HTMLFormElement;
    form.noValidate = true;
    form.appendChild(element('h3', 'twarga-section-title', 'New VM'));

    const specs: Record<
      CreateField,
      { label: string; build: () => HTMLElement }
    > = {
      name: { label: 'Name', build: () => input('text', 'name', '', 'web-1') },
      image: { label: 'Image', build: () => document.createElement('select') },
      ram: { label: 'RAM (MB)', build: () => input('number', 'ram', '512') },
      cpu: { label: 'CPUs', build: () => input('number', 'cpu', '1') },
      disk: { label: 'Disk (GB)', build: () => input('number', 'disk', '10') }
    };
    for (const field of CREATE_FIELDS) {
      const spec = specs[field];
      const row = element('div', 'twarga-field');
      row.dataset.field = field;
      const control = spec.build() as HTMLInputElement | HTMLSelectElement;
      control.name = field;
      control.id = `twarga-create-${field}`;
      control.classList.add('jp-mod-styled', 'twarga-input');
      const label = element(
        'label',
        'twarga-label',
        spec.label
      ) as HTMLLabelElement;
      label.htmlFor = control.id;
      const error = element('div', 'twarga-field-error');
      error.dataset.field = field;
      error.hidden = true;
      row.append(label, control, error);
      form.appendChild(row);
      this._inputs[field] = control;
      this._fieldErrors[field] = error;
    }
    this._formError = form.appendChild(element('div', 'twarga-form-error'));
    this._formError.hidden = true;
    this._formStatus = form.appendChild(element('div', 'twarga-form-status'));

    const submit = element(
      'button',
      'jp-mod-styled jp-mod-accept twarga-button',
      'Create VM'
    );
    (submit as HTMLButtonElement).type = 'submit';
    submit.dataset.action = 'create';
    this._submit = form.appendChild(submit) as HTMLButtonElement;

    form.addEventListener('submit', event => {
      event.preventDefault();
      void this._create();
    });
    return form;
  }

  private async _create(): Promise<void> {
    this._clearFormErrors();
    const request = this._readForm();
    if (!request) {
      return;
    }
    this._submit.disabled = true;
    this._submit.textContent = 'Creating…';
    try {
      const vm = await this._model.createVM(request);
      this._formStatus.textContent = `${vm.name} was created: its status shows in the list above.`;
      (this._inputs.name as HTMLInputElement).value = '';
    } catch (error) {
      const field = fieldOf(error);
      if (field) {
        this._showFieldError(field, messageOf(error));
      } else {
        this._formError.textContent = messageOf(error);
        this._formError.hidden = false;
      }
    } finally {
      this._submit.disabled = false;
      this._submit.textContent = 'Create VM';
    }
  }

  /** The request the form describes, or null after showing what is wrong. */
  private _readForm(): ICreateVM | null {
    const name = (this._inputs.name as HTMLInputElement).value.trim();
    if (!name) {
      this._showFieldError('name', 'Give the VM a name, e.g. web-1.');
      return null;
    }
    const request: ICreateVM = { name };
    const image = (this._inputs.image as HTMLSelectElement).value;
    if (image) {
      request.image = image;
    }
    let ok = true;
    for (const field of ['ram', 'cpu', 'disk'] as const) {
      const raw = (this._inputs[field] as HTMLInputElement).value.trim();
      if (raw === '') {
        continue;
      }
      if (!/^\d+$/.test(raw)) {
        this._showFieldError(field, `${field} must be a whole number`);
        ok = false;
        continue;
      }
      request[field] = Number(raw);
    }
    return ok ? request : null;
  }

  private _showFieldError(field: CreateField, message: string): void {
    const error = this._fieldErrors[field];
    error.textContent = message;
    error.hidden = false;
    this._inputs[field].setAttribute('aria-invalid', 'true');
    this._inputs[field].focus();
  }

  private _clearFormErrors(): void {
    for (const field of CREATE_FIELDS) {
      this._fieldErrors[field].textContent = '';
      this._fieldErrors[field].hidden = true;
      this._inputs[field].removeAttribute('aria-invalid');
    }
    this._formError.textContent = '';
    this._formError.hidden = true;
    this._formStatus.textContent = '';
  }

  private _model: TwargaModel;
  private _openConsole: (vm: IVM) => void;
  private _user: HTMLElement;
  private _credits: HTMLElement;
  private _quota: HTMLElement;
  private _serviceStatus: HTMLElement;
  private _empty: HTMLElement;
  private _list: HTMLElement;
  private _form: HTMLFormElement;
  private _formError!: HTMLElement;
  private _formStatus!: HTMLElement;
  private _submit!: HTMLButtonElement;
  private _inputs = {} as Record<
    CreateField,
    HTMLInputElement | HTMLSelectElement
  >;
  private _fieldErrors = {} as Record<CreateField, HTMLElement>;
  private _rows = new Map<number, VMRow>();
}

export namespace TwargaPanel {
  export interface IOptions {
    model: TwargaModel;
    /** Open the console tab of a VM. */
    openConsole: (vm: IVM) => void;
  }
}

/** One VM in the list, built once and updated in place. */
class VMRow {
  constructor(vm: IVM, onAction: (action: RowAction, row: VMRow) => void) {
    this.vm = vm;
    this.node = element('div', 'twarga-vm');
    const head = this.node.appendChild(element('div', 'twarga-vm-head'));
    this._name = head.appendChild(element('span', 'twarga-vm-name'));
    this._status = head.appendChild(element('span', 'twarga-vm-status'));
    const details = this.node.appendChild(element('div', 'twarga-vm-details'));
    this._spec = details.appendChild(element('span', 'twarga-vm-spec'));
    this._uptime = details.appendChild(element('span', 'twarga-vm-uptime'));
    this._ssh = details.appendChild(element('span', 'twarga-vm-ssh'));
    this._message = this.node.appendChild(element('div', 'twarga-vm-message'));
    this._error = this.node.appendChild(element('div', 'twarga-vm-error'));
    this._error.hidden = true;
    const actions = this.node.appendChild(element('div', 'twarga-vm-actions'));
    for (const { action, label, title } of ROW_ACTIONS) {
      const classes =
        action === 'destroy'
          ? 'jp-mod-styled jp-mod-warn twarga-button'
          : 'jp-mod-styled twarga-button';
      const button = element('button', classes, label) as HTMLButtonElement;
      button.type = 'button';
      button.title = title;
      button.dataset.action = action;
      button.addEventListener('click', () => onAction(action, this));
      actions.appendChild(button);
      this._buttons.set(action, button);
    }
  }

  readonly node: HTMLElement;
  vm: IVM;

  update(vm: IVM): void {
    this.vm = vm;
    this.node.dataset.vmId = String(vm.id);
    this.node.dataset.vmName = vm.name;
    this.node.dataset.status = vm.status;
    this._name.textContent = vm.name;
    this._status.textContent = vm.status;
    this._status.className = `twarga-vm-status twarga-status-${vm.status}`;
    this._spec.textContent = formatSpec(vm);
    this._uptime.textContent =
      vm.status === 'running' ? `up ${formatUptime(vm.uptime)}` : '';
    const ssh = formatSSH(vm);
    this._ssh.textContent = ssh ? `ssh ${ssh}` : '';
    this._message.textContent = vm.status_message ?? '';
    this._message.hidden = !vm.status_message;
    this._refreshButtons();
  }

  setBusy(busy: boolean): void {
    this._busy = busy;
    this.node.classList.toggle('twarga-mod-busy', busy);
    this._refreshButtons();
  }

  setError(message: string | null): void {
    this._error.textContent = message ?? '';
    this._error.hidden = !message;
  }

  private _refreshButtons(): void {
    for (const [action, button] of this._buttons) {
      button.disabled = this._busy || !ENABLED[action].includes(this.vm.status);
    }
  }

  private _name: HTMLElement;
  private _status: HTMLElement;
  private _spec: HTMLElement;
  private _uptime: HTMLElement;
  private _ssh: HTMLElement;
  private _message: HTMLElement;
  private _error: HTMLElement;
  private _buttons = new Map<RowAction, HTMLButtonElement>();
  private _busy = false;
}

function element(tag: string, className: string, text?: string): HTMLElement {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text;
  }
  return node;
}

function input(
  type: string,
  name: string,
  value: string,
  placeholder = ''
): HTMLInputElement {
  const node = document.createElement('input');
  node.type = type;
  node.name = name;
  node.value = value;
  node.placeholder = placeholder;
  node.autocomplete = 'off';
  node.spellcheck = false;
  return node;
}

function messageOf(error: unknown): string {
  if (error instanceof Error) {
    return error.message;
  }
  return String(error);
}

/** The form field an API error is about, if any. */
function fieldOf(error: unknown): CreateField | null {
  if (!(error instanceof TwargaAPIError)) {
    return null;
  }
  const known = (name: string | null | undefined): name is CreateField =>
    !!name && (CREATE_FIELDS as readonly string[]).includes(name);
  if (known(error.field)) {
    return error.field;
  }
  if (error.reason === 'name_taken') {
    return 'name';
  }
  // 400s name the key in quotes first: "'ram' must be an integer".
  const quoted = /^'([a-z_]+)'/.exec(error.message)?.[1];
  return error.status === 400 && known(quoted) ? quoted : null;
}
